"""The HTTP protocol's vocabulary: header names, content types, the digest format, addresses.

Spelled once here and shared by the client, the server and the KV API (the way
aiohttp keeps ``hdrs.py``), so the two ends of a request cannot drift apart. No
aiohttp and no Raft core: only names, patterns and the address rule. The wire
protocol itself is described in docs/protocol.md.
"""

from __future__ import annotations

import re
from typing import Final

from yarl import URL

__all__ = [
    "H_CLUSTER",
    "H_SNAPSHOT_ID",
    "H_SNAPSHOT_META",
    "H_SNAPSHOT_OFFSET",
    "H_SNAPSHOT_SHA256",
    "H_SNAPSHOT_SIZE",
    "H_VOTE",
    "JSON",
    "OCTET_STREAM",
    "SHA256_HEX",
    "parse_node_address",
]

H_CLUSTER: Final = "Raft-Cluster"
"""The cluster name a request is meant for; a node serving another cluster answers 412."""
H_VOTE: Final = "Raft-Vote"
H_SNAPSHOT_META: Final = "Raft-Snapshot-Meta"
H_SNAPSHOT_SIZE: Final = "Raft-Snapshot-Size"
H_SNAPSHOT_OFFSET: Final = "Raft-Snapshot-Offset"
H_SNAPSHOT_ID: Final = "Raft-Snapshot-Id"
H_SNAPSHOT_SHA256: Final = "Raft-Snapshot-Sha256"

JSON: Final = "application/json"
"""Every RPC body and every answer, errors included."""
OCTET_STREAM: Final = "application/octet-stream"
"""A streamed snapshot body."""

SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
"""A snapshot digest as senders write it: 64 lowercase hex digits (receivers lowercase first)."""


def parse_node_address(addr: str) -> URL:
    """The base URL of a node: ``host:port`` means ``http://host:port``.

    Raises ``ValueError`` for anything else than that or an ``http(s)://host[:port][/prefix]``
    URL (no query, fragment or credentials), so a bad address fails at ``new_client``.
    """
    if not isinstance(addr, str) or not addr or addr != addr.strip():
        raise ValueError(f"invalid node address {addr!r}")
    full = "://" in addr
    try:
        url = URL(addr if full else f"http://{addr}")
    except ValueError as e:
        raise ValueError(f"invalid node address {addr!r}: {e}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"invalid node address {addr!r}: scheme must be http or https")
    if not url.host:
        raise ValueError(f"invalid node address {addr!r}: no host")
    if url.query_string or url.fragment or url.user is not None or url.password is not None:
        raise ValueError(f"invalid node address {addr!r}: no query, fragment or credentials")
    if not full and (url.explicit_port is None or url.path not in ("", "/")):
        raise ValueError(f"invalid node address {addr!r}: expected host:port or an http(s) URL")
    if not url.path.endswith("/"):
        url = url.with_path(url.path + "/")
    return url
