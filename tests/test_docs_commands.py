"""Every shell command in the operator docs runs, in order, and prints what the docs show.

For each document in ``DOCS``: every ```sh block runs, in order, in ONE bash session with
``set -euo pipefail``, in a scratch directory (so what one block exports or starts in the
background serves the next, as in an operator's terminal), with
the ports 21001-21009 of the text mapped to free ports below the ephemeral range. A ```text
block right after a ```sh block lists lines that must appear, in order, in what the block
printed on stdout and stderr (each line a substring of one output line). A block preceded by
``<!-- docs-test: skip (...) -->`` is not run; only the install step may be. Every process a
document started is SIGKILLed afterwards (found by a marker in its environment).

``docs/configuration.md`` is checked against the argparse parser instead, both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from .cluster_helpers import free_ports
except ImportError:
    from cluster_helpers import free_ports  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["getting-started.md", "operations.md", "embedding.md", "troubleshooting.md", "kv.md"]
SKIP = "<!-- docs-test: skip"
BLOCK_TIMEOUT = 90.0

_BLOCKS = re.compile(r"^(<!-- docs-test: skip[^\n]*-->\n)?```(sh|text)\n(.*?)^```$", re.M | re.S)
_PORT = re.compile(r"\b2100([1-9])\b")


@dataclass
class Block:
    script: str
    skip: bool
    expected: list[str]


def parse(text: str) -> list[Block]:
    blocks: list[Block] = []
    for m in _BLOCKS.finditer(text):
        skip, lang, body = m.group(1), m.group(2), m.group(3)
        if lang == "sh":
            blocks.append(Block(body, skip is not None, []))
        else:
            assert blocks, "a ```text block before any ```sh block"
            assert not blocks[-1].expected, "two ```text blocks after one ```sh block"
            blocks[-1].expected = [line for line in body.splitlines() if line.strip()]
    return blocks


def _kill_marked(marker: str) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if f"RAFT_HTTP_DOCS_RUN={marker}".encode() in (proc / "environ").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)


def _check_output(expected: list[str], output: str, script: str) -> None:
    lines = output.splitlines()
    at = 0
    for want in expected:
        for i in range(at, len(lines)):
            if want.strip() in lines[i]:
                at = i + 1
                break
        else:
            pytest.fail(f"{want!r} not printed (in order) by:\n{script}\n--- output ---\n{output}")


@pytest.mark.timeout(600)  # a whole document: nodes started, restarted, backed up
@pytest.mark.parametrize("doc", DOCS)
def test_every_command_of_the_doc_runs(doc: str, tmp_path: Path) -> None:
    blocks = parse((ROOT / "docs" / doc).read_text())
    assert blocks, f"{doc} has no ```sh blocks"
    skipped = [b.script for b in blocks if b.skip]
    assert all("pip install" in s for s in skipped), (
        f"only the install step may be skipped: {skipped}"
    )
    ports = free_ports(9)
    marker = uuid.uuid4().hex
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAFT_HTTP_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "REPO": str(ROOT),
        "RAFT_HTTP_DOCS_RUN": marker,
    }

    def ported(text: str) -> str:
        return _PORT.sub(lambda m: str(ports[int(m.group(1)) - 1]), text)

    shell = subprocess.Popen(
        ["bash", "--norc", "--noprofile"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert shell.stdout is not None
        for line in shell.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    done = f"__block_done_{marker}__"
    try:
        for i, block in enumerate(blocks):
            if block.skip:
                continue
            script = ported(block.script)
            path, out = tmp_path / f".block{i}.sh", tmp_path / f".block{i}.out"
            path.write_text(script)
            assert shell.stdin is not None
            shell.stdin.write(
                f"set -euo pipefail; source {path} >{out} 2>&1 </dev/null; set +eu; echo {done}\n"
            )
            shell.stdin.flush()
            try:
                line = lines.get(timeout=BLOCK_TIMEOUT)
            except queue.Empty:
                pytest.fail(
                    f"{doc}: no end within {BLOCK_TIMEOUT:g}s:\n{script}\n{out.read_text()}"
                )
            output = out.read_text()
            assert line is not None, f"{doc}: failed (exit {shell.wait(10)}):\n{script}\n{output}"
            assert line.strip() == done, line
            _check_output([ported(line) for line in block.expected], output, script)
    finally:
        if shell.poll() is None:
            shell.kill()
        shell.wait(10)
        _kill_marked(marker)
        for log in sorted(tmp_path.glob("*.log")):
            print(f"--- {log.name} ---\n" + "\n".join(log.read_text().splitlines()[-20:]))


# --- the configuration reference and the parser ---------------------------------------


def _node_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    for name in list(os.environ):
        if name.startswith("RAFT_HTTP_"):
            monkeypatch.delenv(name)
    from raft_http.kv.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    node: argparse.ArgumentParser = sub.choices["node"]
    return node


_ROW = re.compile(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]*) \| ([^|]*) \|$", re.M)


def test_the_configuration_reference_is_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    documented = {m.group(1): m.group(2).strip() for m in _ROW.finditer(text)}
    parser = _node_parser(monkeypatch)
    options = {
        a.option_strings[-1]: a for a in parser._actions if a.option_strings and a.dest != "help"
    }
    assert set(documented) == set(options), "docs/configuration.md and `raft-http node` differ"
    for name, action in options.items():
        if action.required:
            want = "required"
        elif action.default is None:
            want = "none"
        else:
            want = f"`{action.default}`"
        assert documented[name].startswith(want), f"{name}: documented {documented[name]!r}"


_KIND = re.compile(r"^\| ((?:`[a-z_]+`(?:, )?)+) \|", re.M)


def test_the_troubleshooting_kinds_are_the_code_s() -> None:
    """Every kind in the table is a string the code answers with (no invented kinds)."""
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    kinds = {k for m in _KIND.finditer(text) for k in re.findall(r"`([a-z_]+)`", m.group(1))}
    assert len(kinds) >= 20
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "raft_http").rglob("*.py"))
    missing = sorted(k for k in kinds if f'"{k}"' not in source)
    assert not missing, f"docs/troubleshooting.md names kinds the code never answers: {missing}"
