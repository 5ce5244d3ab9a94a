"""``raft-http`` admin subcommands after etcdctl: tables for people, ``--json`` for scripts.

Exit codes (stable; scripts may rely on them):

- ``0`` done;
- ``1`` refused: the cluster answered and said no (bad request, not allowed, a write whose
  outcome is unknown, or no leader within ``--timeout``);
- ``2`` usage: bad options or arguments (argparse);
- ``3`` unreachable: no node answered at any ``--addr``.

Every failure prints one line to stderr: ``raft-http: <what>: <why>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Final

import msgspec

from ..types import encode_json
from .client import RAFT_TOKEN_ENV, TOKEN_ENV, ClusterStatus, KVClient, KVError, KVUnreachable

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3

ADDR_ENV: Final = "RAFT_HTTP_ADDR"
DEFAULT_ADDR: Final = "127.0.0.1:21001"

Command = Callable[[KVClient, argparse.Namespace], Coroutine[Any, Any, Any]]


def _node_id(value: str) -> int:
    if not value.isdigit() or int(value) >= 2**63:
        raise argparse.ArgumentTypeError(f"expected a node id in 0..2^63-1, got {value!r}")
    return int(value)


def _member(value: str) -> tuple[int, str]:
    node_id, sep, addr = value.partition("=")
    if not sep or not addr:
        raise argparse.ArgumentTypeError(f"expected ID=HOST:PORT, got {value!r}")
    return _node_id(node_id), addr


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--addr",
        action="append",
        metavar="ADDR",
        help=f"a member's address; repeat for more (default: ${ADDR_ENV} or {DEFAULT_ADDR})",
    )
    parser.add_argument(
        "--api-token",
        default=None,
        help=f"bearer token for the KV API (default: ${TOKEN_ENV}, else ${RAFT_TOKEN_ENV}; "
        "prefer those or --api-token-file: a command line is visible to other users)",
    )
    parser.add_argument(
        "--api-token-file", metavar="FILE", help="read the API token from this file"
    )
    parser.add_argument("--cacert", metavar="FILE", help="CA to verify HTTPS nodes with")
    parser.add_argument("--cert", metavar="FILE", help="client certificate (mutual TLS)")
    parser.add_argument("--key", metavar="FILE", help="the client certificate's key")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up after this long, retries included (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``status``, ``init``, ``add-learner``, ``remove-learner``, ``transfer-leader``,
    ``change-membership``, ``put``, ``get`` and ``delete`` on the ``raft-http`` parser."""

    def command(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help + ".")
        _common(parser)
        parser.set_defaults(admin=run)
        return parser

    command("status", _status, "show every member: role, term, log, commit, applied, lag")
    init = command("init", _init, "initialize a new cluster at the first --addr")
    init.add_argument(
        "members",
        nargs="*",
        type=_member,
        metavar="ID=HOST:PORT",
        help="the first voters (none: the node at --addr alone)",
    )
    learner = command("add-learner", _add_learner, "add a node as a learner; waits until caught up")
    learner.add_argument("id", type=_node_id)
    learner.add_argument("node_addr", metavar="HOST:PORT")
    remove = command("remove-learner", _remove_learner, "remove learners (not voters)")
    remove.add_argument("ids", nargs="+", type=_node_id, metavar="ID")
    transfer = command("transfer-leader", _transfer_leader, "hand leadership to another voter")
    transfer.add_argument(
        "id", nargs="?", type=_node_id, metavar="ID", help="the voter (default: the most caught up)"
    )
    change = command("change-membership", _change_membership, "set the voters")
    change.add_argument("voters", nargs="+", type=_node_id, metavar="ID")
    put = command("put", _put, "set a key")
    put.add_argument("key")
    put.add_argument("value")
    get = command("get", _get, "read a key (linearizable unless --stale)")
    get.add_argument("key")
    get.add_argument(
        "--stale", action="store_true", help="read the first node's local state (may be stale)"
    )
    delete = command("delete", _delete, "delete a key")
    delete.add_argument("key")


# --- the commands -------------------------------------------------------------------


async def _status(client: KVClient, args: argparse.Namespace) -> Any:
    status = await client.cluster_status()
    if args.json:
        return status
    print(format_status(status))
    return None


async def _init(client: KVClient, args: argparse.Namespace) -> Any:
    answer = await client.init(dict(args.members) if args.members else None)
    if args.json:
        return answer
    nodes = answer.get("initialized", {}) if isinstance(answer, dict) else {}
    print("initialized:", ", ".join(f"{i}={n['addr']}" for i, n in nodes.items()))
    return None


async def _add_learner(client: KVClient, args: argparse.Namespace) -> Any:
    result = await client.add_learner(args.id, args.node_addr)
    if args.json:
        return result
    print(f"learner {args.id} added at {_log_index(result.log_id)}")
    return None


async def _remove_learner(client: KVClient, args: argparse.Namespace) -> Any:
    result = await client.remove_learner(*args.ids)
    if args.json:
        return result
    ids = " ".join(str(i) for i in sorted(set(args.ids)))
    print(f"removed learner(s) {ids} (at {_log_index(result.log_id)})")
    return None


async def _transfer_leader(client: KVClient, args: argparse.Namespace) -> Any:
    leader_id = await client.transfer_leader(args.id)
    if args.json:
        return {"leader_id": leader_id}
    print(f"node {leader_id} leads now")
    return None


async def _change_membership(client: KVClient, args: argparse.Namespace) -> Any:
    result = await client.change_membership(args.voters)
    if args.json:
        return result
    voters = " ".join(str(v) for v in sorted(set(args.voters)))
    print(f"voters are now {voters} (at {_log_index(result.log_id)})")
    return None


async def _put(client: KVClient, args: argparse.Namespace) -> Any:
    result = await client.put(args.key, args.value)
    if args.json:
        return result
    print("OK")
    return None


async def _get(client: KVClient, args: argparse.Namespace) -> Any:
    value = await client.get(args.key, stale=args.stale)
    if args.json:
        return {"key": args.key, "value": value}
    if value is None:
        print(f"raft-http get: key {args.key!r} not found (exit 0, as etcdctl)", file=sys.stderr)
        return None
    print(value)
    return None


async def _delete(client: KVClient, args: argparse.Namespace) -> Any:
    result = await client.delete(args.key)
    if args.json:
        return result
    print("deleted" if result.data and result.data.get("value") is not None else "not found")
    return None


def _log_index(log_id: Any) -> str:
    return "log index -" if log_id is None else f"log index {log_id.index}"


# --- output ---------------------------------------------------------------------------

STATUS_COLUMNS: Final = (
    "ID",
    "ADDRESS",
    "VOTER",
    "ROLE",
    "TERM",
    "LAST LOG",
    "COMMITTED",
    "APPLIED",
    "LAG",
    "REACHABLE",
)


def format_status(status: ClusterStatus) -> str:
    """The status table, one row per member, then one line per unreachable or failed member."""

    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    rows = [list(STATUS_COLUMNS)]
    notes = []
    for m in status.members:
        rows.append(
            [
                str(m.id),
                m.addr,
                "yes" if m.voter else "no",
                cell(m.role),
                cell(m.term),
                cell(m.last_log),
                cell(m.committed),
                cell(m.applied),
                cell(m.lag),
                "yes" if m.reachable else "no",
            ]
        )
        if m.error:
            notes.append(f"node {m.id}: {m.error}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(STATUS_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    leader = "none" if status.leader is None else f"{status.leader} (term {status.term})"
    return "\n".join([*lines, f"leader: {leader}", *notes])


# --- running one command --------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    if args.api_token_file:
        try:
            with open(args.api_token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise _UsageError(f"--api-token-file {args.api_token_file}: {e.strerror}") from None
    return args.api_token or None  # None: KVClient reads the environment


def _ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.cacert is None and args.cert is None:
        return None
    if (args.cert is None) != (args.key is None):
        raise _UsageError("--cert and --key go together")
    try:
        context = ssl.create_default_context(cafile=args.cacert)
        if args.cert is not None:
            context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as e:
        raise _UsageError(f"TLS files: {getattr(e, 'strerror', None) or e}") from None
    return context


class _UsageError(Exception):
    pass


def run_admin(args: argparse.Namespace) -> int:
    """Run the parsed admin command; print its answer; return the documented exit code."""
    name = args.command
    try:
        addrs = args.addr or [os.environ.get(ADDR_ENV) or DEFAULT_ADDR]
        if args.timeout <= 0:
            raise _UsageError(f"--timeout must be > 0, got {args.timeout:g}")
        client = KVClient(
            addrs,
            token=_token(args),
            ssl=_ssl(args),
            deadline=args.timeout,
            request_timeout=min(5.0, args.timeout),
            unreachable_rounds=1,
        )
    except (_UsageError, ValueError) as e:
        print(f"raft-http {name}: {e}", file=sys.stderr)
        return EXIT_USAGE
    run: Command = args.admin

    async def main() -> Any:
        async with client:
            return await run(client, args)

    try:
        answer = asyncio.run(main())
    except KVUnreachable as e:
        print(f"raft-http {name}: unreachable: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KVError as e:
        print(f"raft-http {name}: {e.kind}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        sys.stdout.write(encode_json(msgspec.to_builtins(answer)).decode() + "\n")
    return EXIT_OK
