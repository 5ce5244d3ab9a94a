"""docs/curl.md is true: run its ```bash blocks against examples/embed_in_app.py and check.

Format of the document (kept simple so it can be parsed, and copied into the README):
a ```bash block holds one command; if it is followed by a line ``→ HTTP <status>`` and a
```json block (the body) or a ```http block (status line and headers), that is the answer
the command must get. A bash block without an answer is a setup step that must succeed.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "curl.md"
EXAMPLE = ROOT / "examples" / "embed_in_app.py"
DOC_PORT = "127.0.0.1:8080"

_TOKENS = re.compile(r"^```(\w+)\n(.*?)\n```$|^→ HTTP (\d{3})$", re.MULTILINE | re.DOTALL)


@dataclass
class Step:
    command: str
    status: int | None = None
    lang: str | None = None
    expected: str | None = None


def parse(text: str) -> list[Step]:
    steps: list[Step] = []
    pending_status: int | None = None
    for m in _TOKENS.finditer(text):
        lang, body, status = m.group(1), m.group(2), m.group(3)
        if status is not None:
            assert steps, "an answer before any command"
            pending_status = int(status)
        elif lang == "bash":
            assert "\n" not in body.strip(), f"one command per block: {body!r}"
            steps.append(Step(body.strip()))
            pending_status = None
        elif lang in ("json", "http"):
            assert pending_status is not None, f"a {lang} block without '→ HTTP <status>'"
            step = steps[-1]
            assert step.expected is None, f"two answers for {step.command!r}"
            step.status, step.lang, step.expected = pending_status, lang, body
            pending_status = None
    return steps


def test_the_document_parses() -> None:
    steps = parse(DOC.read_text())
    answered = [s for s in steps if s.expected is not None]
    assert len(answered) >= 10
    text = " ".join(s.command for s in steps)
    for needed in ("/raft/vote", "/raft/append", "-T snapshot.bin", "curl -s -I", "Bearer wrong"):
        assert needed in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"the example exited with {proc.returncode}: {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail("the example did not start listening in 20 s")


def run(command: str, cwd: Path) -> tuple[int, str, str]:
    """Run one doc command; returns (status, headers, body) of the final answer."""
    body, headers = cwd / "_body", cwd / "_headers"
    for f in (body, headers):
        f.unlink(missing_ok=True)
    full = f"{command} --max-time 20 -o {body} -D {headers} -w '%{{http_code}}'"
    done = subprocess.run(
        ["bash", "-c", full], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"{command}\nexit {done.returncode}: {done.stderr}"
    read = lambda f: f.read_text() if f.exists() else ""  # noqa: E731
    return int(done.stdout.strip()[-3:]), read(headers), read(body)


def final_header_block(raw: str) -> list[str]:
    """The last response's lines (drops an interim ``100 Continue``)."""
    blocks = [b for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    return blocks[-1].splitlines()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_every_curl_example_answers_as_documented(tmp_path: Path) -> None:
    steps = parse(DOC.read_text())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(proc, port)
        for step in steps:
            command = step.command.replace(DOC_PORT, f"127.0.0.1:{port}")
            if step.expected is None:
                done = subprocess.run(
                    ["bash", "-c", command], cwd=tmp_path, timeout=30, check=False
                )
                assert done.returncode == 0, command
                continue
            status, headers, body = run(command, tmp_path)
            assert status == step.status, f"{step.command}\n-> {status} {body}"
            if step.lang == "json":
                assert json.loads(body) == json.loads(step.expected), step.command
            else:
                got = final_header_block(headers)
                want = step.expected.splitlines()
                assert got[0].split()[1] == want[0].split()[1], (got, want)
                lowered = {line.lower() for line in got[1:]}
                for line in want[1:]:
                    assert line.lower() in lowered, f"{line!r} not in {got}"
    finally:
        proc.kill()
        proc.wait(10)


def test_readme_shows_the_same_commands() -> None:
    """The README's curl section is docs/curl.md's, so the run above checks it too."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- curl:begin -->", 1)[1].split("<!-- curl:end -->", 1)[0]
    assert parse(section) == parse(DOC.read_text())
