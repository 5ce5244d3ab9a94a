"""``raft-http node``: run one key-value node until SIGINT or SIGTERM (then exit 0).

Example, three nodes on one machine (then ``curl -d '[[1,"127.0.0.1:21001"],...]'
127.0.0.1:21001/init``)::

    raft-http node --id 1 --listen 127.0.0.1:21001 --data-dir ./data/1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence

from .. import __version__
from ..raft import Config
from .admin import add_admin_commands, run_admin
from .node import KVNode

logger = logging.getLogger("raft_http.kv.cli")
_DEFAULTS = Config()


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _non_negative_int(value: str) -> int:
    if not value.isdigit():
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
    node.add_argument("--id", type=_non_negative_int, required=True, help="this node's id")
    node.add_argument(
        "--listen", type=_host_port, required=True, metavar="HOST:PORT", help="where to listen"
    )
    node.add_argument(
        "--data-dir", required=True, help="the Raft log, snapshots and snapshot spool live here"
    )
    node.add_argument(
        "--advertise",
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
        "--write-timeout",
        type=float,
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
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: %(default)s",
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
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(args.tls_cert, args.tls_key)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca)
    client.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_ca is not None:
        server.load_verify_locations(args.tls_ca)
        server.verify_mode = ssl.CERT_REQUIRED
    return server, client


async def run_node(args: argparse.Namespace) -> int:
    host, port = args.listen
    server_ssl, client_ssl = _ssl_contexts(args)
    config = Config(
        cluster_name=args.cluster or _DEFAULTS.cluster_name,
        snapshot_logs_since_last=args.snapshot_logs,
        max_in_snapshot_log_to_keep=args.keep_logs,
    )
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
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "starting node %d on %s:%d, data in %s (snapshot every %d logs, keep %d)",
        args.id,
        host,
        port,
        args.data_dir,
        args.snapshot_logs,
        args.keep_logs,
    )
    await node.start()
    logger.info("node %d ready at %s", args.id, node.url)
    if node.api_token is None:
        logger.warning(
            "no --token or --api-token: anyone who can reach %s can init, reconfigure, "
            "write and read this node",
            node.url,
        )
    try:
        await stop.wait()
        logger.info("signal received: shutting node %d down", args.id)
        if args.transfer_timeout > 0:
            await node.hand_over(args.transfer_timeout)
    finally:
        await node.stop()
    logger.info("node %d shut down cleanly", args.id)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "node":
        return run_admin(args)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s [node " + str(args.id) + "] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(run_node(args))
    except OSError as e:
        logger.error("cannot run node %d: %s", args.id, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
