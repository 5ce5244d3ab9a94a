"""Starting a node: the mistakes an operator makes in the first hour are refused, clearly.

A data directory serves one process at a time and one node id for ever; a start that
fails leaves nothing new behind; every option is checked and every error names its
culprit; a node that fails fatally exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_helpers import HOST, ProcessCluster, free_ports, http, wait_for
from raft_http.kv.cli import build_parser, node_config, serve
from raft_http.kv.datadir import IDENTITY_FILE, DataDirError
from raft_http.kv.node import KVNode
from raft_http.raft import Config
from test_cluster_processes import _cli


def _node_argv(node_id: int, port: int, data_dir: Path, *extra: str) -> list[str]:
    return [
        "node",
        "--id",
        str(node_id),
        "--listen",
        f"{HOST}:{port}",
        "--data-dir",
        str(data_dir),
        *extra,
    ]


# --- the data directory ---------------------------------------------------------------------


async def test_a_second_node_on_a_live_directory_is_refused(
    tmp_path: Path, nodes: list[KVNode]
) -> None:
    first = KVNode(1, tmp_path / "d", port=0)
    nodes.append(first)
    await first.start()
    second = KVNode(1, tmp_path / "d", port=0)
    with pytest.raises(
        DataDirError, match=rf"in use by another node process \(pid {os.getpid()}\)"
    ):
        await second.start()
    # The live node is untouched: it still serves, and its files are all there.
    assert first.raft.metrics().running
    assert (tmp_path / "d" / "raft.sqlite3").exists()
    await first.stop()
    nodes.remove(first)
    # Once the first is gone, the directory is free again.
    third = KVNode(1, tmp_path / "d", port=0)
    nodes.append(third)
    await third.start()


def test_cli_second_process_names_the_first(tmp_path: Path) -> None:
    first_port, second_port = free_ports(2)
    data_dir = tmp_path / "d"
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "raft_http.kv.cli", *_node_argv(1, first_port, data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://{HOST}:{first_port}/metrics"
        wait_for("the first node to serve", lambda: http("GET", url, timeout=2)[0] == 200, 20)
        second = _cli(*_node_argv(1, second_port, data_dir), timeout=30)
        assert second.returncode == 1, second.stderr
        errors = [line for line in second.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1, second.stderr
        assert f"in use by another node process (pid {first.pid})" in errors[0]
        assert str(data_dir) in errors[0]
        assert first.poll() is None  # the first node keeps running
    finally:
        first.kill()
        first.wait(timeout=10)


async def test_a_directory_keeps_its_node_id(tmp_path: Path, nodes: list[KVNode]) -> None:
    node = KVNode(4, tmp_path / "d", port=0)
    await node.start()
    await node.stop()
    assert json.loads((tmp_path / "d" / IDENTITY_FILE).read_text()) == {"node_id": 4}
    before = sorted(p.name for p in (tmp_path / "d").iterdir())
    stranger = KVNode(9, tmp_path / "d", port=0)
    with pytest.raises(DataDirError, match="belongs to node 4, not node 9: start it with --id 4"):
        await stranger.start()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == before
    again = KVNode(4, tmp_path / "d", port=0)
    nodes.append(again)
    await again.start()


def _taken_port() -> tuple[socket.socket, int]:
    (port,) = free_ports(1)
    sock = socket.socket()
    sock.bind((HOST, port))
    sock.listen()
    return sock, port


async def test_a_failed_start_leaves_no_new_directory(tmp_path: Path) -> None:
    taken, port = _taken_port()
    node = KVNode(1, tmp_path / "new" / "deeper", port=port)
    with taken, pytest.raises(OSError, match="address already in use"):
        await node.start()
    assert not (tmp_path / "new").exists()


async def test_a_failed_start_leaves_an_existing_directory_as_it_was(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "keep-me").write_text("operator's file")
    taken, port = _taken_port()
    with taken, pytest.raises(OSError, match="address already in use"):
        await KVNode(1, data_dir, port=port).start()
    assert [p.name for p in data_dir.iterdir()] == ["keep-me"]


def test_cli_port_in_use_names_the_address_and_leaves_nothing(tmp_path: Path) -> None:
    taken, port = _taken_port()
    with taken:
        proc = _cli(*_node_argv(1, port, tmp_path / "d"))
    assert proc.returncode == 1, proc.stderr
    assert f"--listen {HOST}:{port}: address already in use" in proc.stderr
    assert "Errno" not in proc.stderr
    assert not (tmp_path / "d").exists()


# --- options and their errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--id", str(2**63)], "--id"),
        (["--id", "-1"], "--id"),
        (["--id", "1e3"], "--id"),
        (["--write-timeout", "-1"], "--write-timeout"),
        (["--write-timeout", "0"], "--write-timeout"),
        (["--write-timeout", "nan"], "--write-timeout"),
        (["--write-timeout", "inf"], "--write-timeout"),
        (["--snapshot-logs", "0"], "--snapshot-logs"),
        (["--keep-logs", "-5"], "--keep-logs"),
        (["--max-in-memory-log-bytes", "-1"], "--max-in-memory-log-bytes"),
        (["--max-in-memory-log-bytes", "1.5MiB"], "--max-in-memory-log-bytes"),
        (["--max-in-memory-log-bytes", "16XB"], "--max-in-memory-log-bytes"),
        (["--max-in-memory-log-bytes", "9" * 5000], "--max-in-memory-log-bytes"),
        (["--advertise", "not an addr"], "--advertise"),
        (["--advertise", "ftp://h:1"], "--advertise"),
        (["--listen", "127.0.0.1:0"], "--listen"),
        (["--listen", "127.0.0.1:70000"], "--listen"),
        (["--event-loop", "trio"], "--event-loop"),
    ],
)
def test_cli_refuses_bad_options(tmp_path: Path, args: list[str], fragment: str) -> None:
    base = {"--id": "1", "--listen": "127.0.0.1:1", "--data-dir": str(tmp_path / "d")}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    argv = ["node"] + [part for item in base.items() for part in item]
    proc = _cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert not (tmp_path / "d").exists()


def test_the_in_memory_log_bound_reaches_the_config() -> None:
    base = ["node", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir", "d"]
    parser = build_parser()
    default = node_config(parser.parse_args(base)).max_in_memory_log_bytes
    assert default == Config().max_in_memory_log_bytes == 16 * 1024 * 1024
    for text, bound in [("4096", 4096), ("256KiB", 256 * 1024), ("64m", 64 * 1024**2), ("0", 0)]:
        args = parser.parse_args([*base, "--max-in-memory-log-bytes", text])
        assert node_config(args).max_in_memory_log_bytes == bound, text


def test_cli_explains_a_bad_in_memory_log_bound(tmp_path: Path) -> None:
    proc = _cli(*_node_argv(1, 1, tmp_path / "d", "--max-in-memory-log-bytes", "-1"))
    assert proc.returncode == 2, proc.stderr
    assert (
        "argument --max-in-memory-log-bytes: expected a size like 4096, 256MiB or 16GiB, "
        "got '-1'" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


def test_cli_names_the_culprit(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (_node_argv(1, port, a_file), f"--data-dir {a_file} is not a directory"),
        (
            _node_argv(1, port, tmp_path / "d", "--tls-cert", "missing.pem", "--tls-key", "k"),
            "--tls-cert missing.pem does not exist",
        ),
        (
            _node_argv(
                1, port, tmp_path / "d", "--tls-cert", str(a_file), "--tls-key", str(a_file)
            ),
            f"--tls-cert {a_file} / --tls-key {a_file}: not a certificate",
        ),
        (
            [
                "node",
                "--id",
                "1",
                "--listen",
                "nohost.invalid:1",
                "--data-dir",
                str(tmp_path / "d"),
            ],
            "cannot resolve 'nohost.invalid'",
        ),
    ]
    for argv, message in cases:
        proc = _cli(*argv)
        assert proc.returncode != 0, proc.stderr
        assert message in proc.stderr, proc.stderr
        assert "Errno" not in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "d").exists()


def test_a_node_runs_on_uvloop_when_asked(tmp_path: Path) -> None:
    cluster = ProcessCluster(tmp_path, [1], ["--event-loop", "uvloop"])
    try:
        cluster.start_all()
        cluster.call(1, "/init", [[1, cluster.addr(1)]], timeout=30)
        cluster.wait_leader()
        cluster.write(1, "k", "v")
        assert cluster.call(1, "/read", "k") == {"value": "v"}
    finally:
        cluster.close()
    assert b"keep 1000; uvloop loop)" in cluster.log_path(1).read_bytes()


def test_uvloop_without_the_extra_is_a_clear_error(tmp_path: Path) -> None:
    argv = _node_argv(1, 1, tmp_path / "d", "--event-loop", "uvloop")
    hide_uvloop = (
        "import sys; sys.modules['uvloop'] = None; from raft_http.kv.cli import main; "
        f"sys.exit(main({argv!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide_uvloop], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert "--event-loop uvloop needs uvloop: pip install 'raft-http[uvloop]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


# --- a fatal node exits ---------------------------------------------------------------------


async def test_a_fatal_node_exits_non_zero_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = KVNode(1, tmp_path / "d", port=0)
    await node.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(node, stop))
    await asyncio.sleep(0.05)
    assert not serving.done()
    node.raft.fail("appending entries failed: disk I/O error")
    async with asyncio.timeout(10):
        code = await serving
    assert code == 1
    assert "node 1 stopped: appending entries failed: disk I/O error" in capsys.readouterr().err


async def test_a_signal_still_exits_zero(tmp_path: Path) -> None:
    node = KVNode(1, tmp_path / "d", port=0)
    await node.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(node, stop))
    stop.set()
    async with asyncio.timeout(10):
        assert await serving == 0
    # The directory is released: another node can take it.
    again = KVNode(1, tmp_path / "d", port=0)
    await again.start()
    await again.stop()
