"""``raft-http node``: run one key-value node until SIGINT or SIGTERM (then exit 0).

Example, three nodes on one machine (then ``curl -d '[[1,"127.0.0.1:21001"],...]'
127.0.0.1:21001/init``)::

    raft-http node --id 1 --listen 127.0.0.1:21001 --data-dir ./data/1
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import math
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from .. import __version__
from ..client import parse_node_address
from ..connections import DEFAULT_IDLE_TIMEOUT, ConnectionLimits
from ..raft import Config
from ..spool import (
    DEFAULT_MAX_SNAPSHOT_SIZE,
    DEFAULT_MAX_UPLOADS,
    DEFAULT_SPOOL_RESERVE,
    SpoolLimits,
)
from ..types import NodeId
from .admin import add_admin_commands, run_admin
from .datadir import DataDirError
from .events import JsonFormatter, RaftContext
from .node import KVNode

logger = logging.getLogger("raft_http.kv.cli")
_DEFAULTS = Config()


_DIGITS = re.compile(r"[0-9]{1,19}")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 1-65535), got {value!r}")
    return host.strip("[]"), int(port)


def _node_id(value: str) -> int:
    """A node id as the wire and the store bound it (``types.NodeId``)."""
    try:
        return msgspec.convert(_non_negative_int(value), NodeId)
    except msgspec.ValidationError as e:
        raise argparse.ArgumentTypeError(f"expected a node id, got {value!r}: {e}") from None


def _address(value: str) -> str:
    """A node address, checked as ``/add-learner`` and ``/init`` check theirs."""
    try:
        parse_node_address(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}") from None
    return value


def _positive_int(value: str) -> int:
    if not _DIGITS.fullmatch(value) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _non_negative_int(value: str) -> int:
    if not _DIGITS.fullmatch(value):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 3600:
        raise argparse.ArgumentTypeError(f"expected seconds (0 to 3600), got {value!r}")
    return seconds


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 86400:  # NaN and inf fail too
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 86400], got {value!r}")
    return seconds


def _env_seconds(name: str, default: float) -> float:
    """Seconds from the environment, or ``default``; a bad value is a usage error."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return _seconds(value)
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"raft-http: ${name}: {e}") from None


def _token(value: str) -> str:
    if not value or value != value.strip():
        raise argparse.ArgumentTypeError("a token must be non-empty, without outer whitespace")
    return value


def _env_token(name: str) -> str | None:
    """A token from the environment (so it need not be on the command line); empty is unset."""
    return os.environ.get(name) or None


_BYTE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _byte_size(value: str) -> int:
    """``1048576``, ``512KiB``, ``256M``, ``16GiB``: binary units, case-insensitive."""
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    digits = text.rstrip("kmgt")
    unit = text[len(digits) :]
    if not _DIGITS.fullmatch(digits) or unit not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size like 4096, 256MiB or 16GiB, got {value!r}"
        )
    return int(digits) * _BYTE_UNITS[unit]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raft-http", description="A key-value store replicated with Raft over HTTP/JSON."
    )
    parser.add_argument("--version", action="version", version=f"raft-http {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    node = commands.add_parser(
        "node",
        help="run one node",
        description="Run one node: the KV API at /, the Raft routes at /raft.",
    )
    node.add_argument("--id", type=_node_id, required=True, help="this node's id")
    node.add_argument(
        "--listen", type=_host_port, required=True, metavar="HOST:PORT", help="where to listen"
    )
    node.add_argument(
        "--data-dir", required=True, help="the Raft log, snapshots and snapshot spool live here"
    )
    node.add_argument(
        "--advertise",
        type=_address,
        metavar="ADDR",
        help="this node's address for peers and clients (default: the --listen address)",
    )
    node.add_argument(
        "--token",
        type=_token,
        default=_env_token("RAFT_HTTP_TOKEN"),
        help="bearer token the Raft routes require and send, and the KV API requires "
        "unless --api-token is given (default: $RAFT_HTTP_TOKEN)",
    )
    node.add_argument(
        "--api-token",
        type=_token,
        default=_env_token("RAFT_HTTP_API_TOKEN"),
        help="bearer token every KV route but /health and /ready requires "
        "(default: $RAFT_HTTP_API_TOKEN, else the Raft token)",
    )
    node.add_argument(
        "--cluster", help="cluster name, checked on every Raft RPC (Raft-Cluster header)"
    )
    node.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    node.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    node.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA that signs peers' certificates: verify peers and require client certificates",
    )
    node.add_argument(
        "--snapshot-logs",
        type=_positive_int,
        default=_DEFAULTS.snapshot_logs_since_last,
        metavar="N",
        help="build a snapshot every N applied logs (default: %(default)s)",
    )
    node.add_argument(
        "--keep-logs",
        type=_non_negative_int,
        default=_DEFAULTS.max_in_snapshot_log_to_keep,
        metavar="N",
        help="logs kept behind the last snapshot for lagging followers (default: %(default)s)",
    )
    node.add_argument(
        "--max-in-memory-log-bytes",
        type=_byte_size,
        default=_DEFAULTS.max_in_memory_log_bytes,
        metavar="BYTES",
        help="application bytes of applied, durable log entries kept in memory; older ones "
        "are read back from disk for a lagging follower; 0: keep none (default: 16MiB)",
    )
    node.add_argument(
        "--write-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long the API waits for a write or a consistent read (default: %(default)s)",
    )
    node.add_argument(
        "--transfer-timeout",
        type=_seconds,
        default=_env_seconds("RAFT_HTTP_TRANSFER_TIMEOUT", 2.0),
        metavar="SECONDS",
        help="on SIGTERM/SIGINT a leader first hands leadership to another voter, waiting "
        "at most this long; 0: exit at once (default: $RAFT_HTTP_TRANSFER_TIMEOUT or 2)",
    )
    node.add_argument(
        "--max-snapshot-size",
        type=_byte_size,
        default=DEFAULT_MAX_SNAPSHOT_SIZE,
        metavar="BYTES",
        help="refuse (413) an incoming snapshot larger than this (default: 16GiB)",
    )
    node.add_argument(
        "--spool-reserve",
        type=_byte_size,
        default=DEFAULT_SPOOL_RESERVE,
        metavar="BYTES",
        help="free disk an incoming snapshot must leave for the log; else 507 (default: 256MiB)",
    )
    node.add_argument(
        "--max-spool-uploads",
        type=_positive_int,
        default=DEFAULT_MAX_UPLOADS,
        metavar="N",
        help="incoming snapshots held at once; more get a retryable 503 (default: %(default)s)",
    )
    node.add_argument(
        "--heartbeat-interval",
        type=_positive_seconds,
        default=_DEFAULTS.heartbeat_interval,
        metavar="SECONDS",
        help="how often a leader sends heartbeats (default: %(default)s)",
    )
    node.add_argument(
        "--election-timeout",
        type=_positive_seconds,
        default=_DEFAULTS.election_timeout_min,
        metavar="SECONDS",
        help="a follower without heartbeats for a random time between this and twice this "
        "starts an election; must exceed --heartbeat-interval (default: %(default)s)",
    )
    node.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="inbound connections held at once; past it the oldest idle non-peer one is "
        "closed (default: the fd limit minus a quarter, at least 64, kept free)",
    )
    node.add_argument(
        "--idle-timeout",
        type=_positive_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection with no request in flight after this (default: %(default)s)",
    )
    node.add_argument(
        "--event-loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop the node runs on; uvloop needs the uvloop extra "
        "(pip install 'raft-http[uvloop]') (default: %(default)s)",
    )
    node.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: %(default)s; info shows each change of leader, term, role and "
        "membership, snapshots and peers lost or back; debug adds per-RPC detail",
    )
    node.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object per line for log shippers (default: %(default)s)",
    )
    add_admin_commands(commands)
    return parser


def _ssl_contexts(
    args: argparse.Namespace,
) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None:
            raise SystemExit("raft-http: --tls-ca needs --tls-cert and --tls-key")
        return None, None
    if args.tls_cert is None or args.tls_key is None:
        raise SystemExit("raft-http: --tls-cert and --tls-key go together")
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        _readable_file(option, path)
    if args.tls_ca is not None:
        _readable_file("--tls-ca", args.tls_ca)
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(args.tls_cert, args.tls_key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        client.load_cert_chain(args.tls_cert, args.tls_key)
    except ssl.SSLError as e:
        raise SystemExit(
            f"raft-http: --tls-cert {args.tls_cert} / --tls-key {args.tls_key}: "
            f"not a certificate and its key ({e.reason or e})"
        ) from None
    if args.tls_ca is not None:
        try:
            client.load_verify_locations(args.tls_ca)
            server.load_verify_locations(args.tls_ca)
        except ssl.SSLError as e:
            raise SystemExit(
                f"raft-http: --tls-ca {args.tls_ca}: not a CA certificate ({e.reason or e})"
            ) from None
        server.verify_mode = ssl.CERT_REQUIRED
    return server, client


def _readable_file(option: str, path: str) -> None:
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise SystemExit(f"raft-http: {option} {path} {what}")
    if not os.access(path, os.R_OK):
        raise SystemExit(f"raft-http: {option} {path} is not readable")


def _check_listen(host: str, port: int) -> None:
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SystemExit(
            f"raft-http: --listen {host}:{port}: cannot resolve {host!r} ({e.strerror})"
        ) from None


def _check_data_dir(path: str) -> None:
    data_dir = Path(path)
    if data_dir.exists() and not data_dir.is_dir():
        raise SystemExit(f"raft-http: --data-dir {path} is not a directory")


def node_config(args: argparse.Namespace) -> Config:
    """The Raft core's ``Config`` from ``raft-http node``'s options."""
    return Config(
        cluster_name=args.cluster or _DEFAULTS.cluster_name,
        snapshot_logs_since_last=args.snapshot_logs,
        max_in_snapshot_log_to_keep=args.keep_logs,
        max_in_memory_log_bytes=args.max_in_memory_log_bytes,
        heartbeat_interval=args.heartbeat_interval,
        election_timeout_min=args.election_timeout,
        election_timeout_max=2 * args.election_timeout,
    )


async def run_node(args: argparse.Namespace) -> int:
    host, port = args.listen
    _check_listen(host, port)
    _check_data_dir(args.data_dir)
    server_ssl, client_ssl = _ssl_contexts(args)
    config = node_config(args)
    node = KVNode(
        args.id,
        args.data_dir,
        host=host,
        port=port,
        advertise=args.advertise,
        token=args.token,
        api_token=args.api_token,
        cluster=args.cluster,
        config=config,
        server_ssl=server_ssl,
        client_ssl=client_ssl,
        write_timeout=args.write_timeout,
        spool_limits=SpoolLimits(
            max_snapshot_size=args.max_snapshot_size,
            reserve_bytes=args.spool_reserve,
            max_uploads=args.max_spool_uploads,
        ),
        connection_limits=ConnectionLimits(
            max_connections=args.max_connections, idle_timeout=args.idle_timeout
        ),
    )
    _RAFT_CONTEXT.metrics = lambda: node.raft.metrics()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "starting node %d on %s:%d, data in %s (snapshot every %d logs, keep %d; %s loop)",
        args.id,
        host,
        port,
        args.data_dir,
        args.snapshot_logs,
        args.keep_logs,
        type(loop).__module__.partition(".")[0],  # the loop running, not the option's name
    )
    await node.start()
    logger.info("node %d ready at %s", args.id, node.url)
    if node.api_token is None:
        logger.warning(
            "no --token or --api-token: anyone who can reach %s can init, reconfigure, "
            "write and read this node",
            node.url,
        )
    return await serve(node, stop, args.transfer_timeout)


async def serve(node: KVNode, stop: asyncio.Event, transfer_timeout: float = 0.0) -> int:
    """Run a started node until ``stop`` is set (0) or it fails fatally (1, reason on stderr).

    On a signal, a leader first hands leadership over (within ``transfer_timeout``; 0:
    not). A node that stopped after a storage error must not linger as a live process that
    answers 503 forever: a supervisor (systemd, Kubernetes) restarts or reports it.
    """
    stopping = asyncio.create_task(stop.wait(), name="raft-http-signal")
    fatal = asyncio.create_task(node.wait_fatal(), name="raft-http-fatal")
    try:
        await asyncio.wait({stopping, fatal}, return_when=asyncio.FIRST_COMPLETED)
        reason = fatal.result() if fatal.done() else None
        if reason is None:
            logger.info("signal received: shutting node %d down", node.node_id)
            if transfer_timeout > 0:
                await node.hand_over(transfer_timeout)
    finally:
        stopping.cancel()
        fatal.cancel()
    await node.stop()
    if reason is not None:
        print(f"raft-http: node {node.node_id} stopped: {reason}", file=sys.stderr, flush=True)
        return 1
    logger.info("node %d shut down cleanly", node.node_id)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "node" and not args.heartbeat_interval < args.election_timeout:
        parser.error("--heartbeat-interval must be less than --election-timeout")
    if args.command != "node":
        return run_admin(args)
    loop_factory = _loop_factory(parser, args.event_loop)
    _setup_logging(args)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(run_node(args))
    except DataDirError as e:
        logger.error("cannot run node %d: %s", args.id, e)
        return 1
    except OSError as e:
        logger.error("cannot run node %d: %s", args.id, _os_error(e, args))
        return 1


def _loop_factory(
    parser: argparse.ArgumentParser, name: str
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``None`` for asyncio's own loop; uvloop's only if it is installed (an extra)."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        parser.error("--event-loop uvloop needs uvloop: pip install 'raft-http[uvloop]'")
    return uvloop.new_event_loop


_RAFT_CONTEXT = RaftContext(lambda: None)
"""Puts the running node's term and role on every log line (``run_node`` points it there)."""


def _setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RAFT_CONTEXT)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter(args.id))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s [node {args.id} term %(raft_term)s %(raft_role)s] "
                "%(name)s: %(message)s"
            )
        )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])


def _os_error(e: OSError, args: argparse.Namespace) -> str:
    """The error with its culprit named: the address for a bind error, else the file."""
    host, port = args.listen
    if e.errno == errno.EADDRINUSE:
        return f"--listen {host}:{port}: address already in use"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"--listen {host}:{port}: no such local address"
    if e.errno == errno.EACCES and not e.filename:
        return f"--listen {host}:{port}: permission denied"
    if e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
