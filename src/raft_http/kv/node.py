"""One key-value node: storage, state machine, network, Raft core and one HTTP server.

The server is ONE aiohttp app: the KV API at the root (``/write``, ``/metrics`` ...)
and the Raft routes mounted under ``/raft`` (``/raft/append``, ``/raft/vote``,
``/raft/snapshot``). aiohttp cannot mount a sub-app at the root, and mounting it
as a sub-app keeps its middlewares, limits and cleanup intact. A node's address
in the membership is its plain base (``127.0.0.1:21001``, as in Openraft's
example): clients and redirects use it as is, and ``RaftPathNetworkFactory``
appends ``/raft`` when a peer's transport is built.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Final

from aiohttp import web

from ..client import HttpNetworkFactory
from ..connections import AcceptErrorFilter, ConnectionGuard, ConnectionLimits, GuardedSite
from ..errors import RaftHttpError
from ..network import RaftNetwork, RaftNetworkFactory
from ..raft import Config, Raft, ServerState, SnapshotStore, SqliteLogStore
from ..server import raft_app
from ..serving import runner_options
from ..spool import SpoolLimits
from ..types import Node
from .api import KV_API, base_url, kv_api
from .datadir import DataDir
from .events import RaftEventLog
from .instruments import InstrumentedLogStore, NodeInstruments
from .openapi import openapi_route
from .state_machine import KVStateMachine
from .status import install_status

logger = logging.getLogger(__name__)

RAFT_PREFIX: Final = "/raft"
"""Where the Raft routes live inside a node's app."""


def raft_url(addr: str, scheme: str = "http") -> str:
    """The base of a node's Raft routes, from its address in the membership."""
    return base_url(addr, scheme) + RAFT_PREFIX


class RaftPathNetworkFactory(RaftNetworkFactory):
    """Points a transport at ``<node address>/raft``, where ``KVNode`` serves the Raft routes."""

    def __init__(self, inner: RaftNetworkFactory, scheme: str = "http") -> None:
        self.inner = inner
        self.scheme = scheme

    def new_client(self, target: int, node: Node) -> RaftNetwork:
        return self.inner.new_client(target, Node(raft_url(node.addr, self.scheme)))

    async def close(self) -> None:
        await self.inner.close()


class KVNode:
    """Assembles and runs one node; ``start()`` then ``stop()``, from the CLI or a test.

    ``port=0`` binds a free port (read ``addr`` after ``start()``); ``advertise`` is
    the address peers and clients use when it differs from ``host:port``.
    ``server_ssl`` / ``client_ssl`` turn on HTTPS for both the API and the Raft routes.
    ``token`` guards the Raft routes; ``api_token`` the KV API, and when it is None the
    Raft token guards the KV API too: a node with a Raft token never takes ``/init`` or a
    membership change (which make it send that token to the addresses named) from a
    caller without a credential.
    ``spool_limits`` bounds the disk that incoming snapshot uploads may take;
    ``connection_limits`` the inbound connections (peers are favoured) and their idle time.
    """

    def __init__(
        self,
        node_id: int,
        data_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        token: str | None = None,
        api_token: str | None = None,
        cluster: str | None = None,
        config: Config | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        write_timeout: float = 10.0,
        spool_limits: SpoolLimits | None = None,
        connection_limits: ConnectionLimits | None = None,
    ) -> None:
        self.node_id = node_id
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.advertise = advertise
        self.token = token
        self.api_token = api_token if api_token is not None else token
        self.cluster = cluster
        if config is None:
            config = Config(cluster_name=cluster) if cluster else Config()
        self.config = config
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.write_timeout = write_timeout
        self.spool_limits = spool_limits
        self.connection_limits = connection_limits or ConnectionLimits()
        self._accept_errors: AcceptErrorFilter | None = None
        self.scheme = "https" if server_ssl is not None else "http"
        self.state_machine = KVStateMachine()
        self.instruments = NodeInstruments()
        self._raft: Raft | None = None
        self._log_store: SqliteLogStore | None = None
        self._network: RaftNetworkFactory | None = None
        self._runner: web.AppRunner | None = None
        self._data_dir: DataDir | None = None
        self.events = RaftEventLog(node_id)
        """Logs the node's leader, term, role and membership changes and its peers' reachability."""

    @property
    def raft(self) -> Raft:
        if self._raft is None:
            raise RuntimeError("the node is not started")
        return self._raft

    @property
    def addr(self) -> str:
        """This node's address in the membership: ``advertise``, or ``host:port``."""
        return self.advertise or f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return base_url(self.addr, self.scheme)

    async def start(self) -> None:
        """Start, or fail leaving the data directory as it was (a new one is removed)."""
        data_dir = DataDir(self.data_dir)
        try:
            await asyncio.to_thread(data_dir.acquire, self.node_id)
            self._data_dir = data_dir
            await self._start()
        except BaseException:
            await self.stop()
            await asyncio.to_thread(data_dir.discard_created)
            raise

    async def _start(self) -> None:
        self._log_store = await InstrumentedLogStore.open_counted(
            self.data_dir / "raft.sqlite3", self.instruments
        )
        snapshot_store = SnapshotStore(self.data_dir / "snapshots")
        inner = HttpNetworkFactory(
            token=self.token,
            cluster=self.cluster,
            ssl=self.client_ssl,
            trace_configs=[self.instruments.trace_config(), self.events.trace_config()],
            stream_observer=self.instruments.stream_message,
        )
        self._network = RaftPathNetworkFactory(inner, self.scheme)
        self._raft = await Raft.create(
            self.node_id,
            self.config,
            self._network,
            self._log_store,
            self.state_machine,
            snapshot_store,
        )
        self.events.watch(self._raft)
        await self.serve(*self.build_app(self._raft))

    def build_app(self, raft: Raft) -> tuple[web.Application, ConnectionGuard]:
        """The node's one HTTP app over ``raft``, and the guard that ``serve`` listens with.

        The KV API at the root, the Raft routes under ``/raft``, the status page and the
        OpenAPI document, behind the connection guard. ``bench/_servers.py kv-stub``
        builds it over a Raft stub to measure what this HTTP stack costs on its own.
        """
        app = kv_api(
            raft,
            self.state_machine,
            node_id=self.node_id,
            addr=self.addr,
            scheme=self.scheme,
            write_timeout=self.write_timeout,
            api_token=self.api_token,
            instruments=self.instruments,
            leader_timeout=self.config.election_timeout_min,
        )
        app.add_subapp(
            RAFT_PREFIX,
            raft_app(
                raft,
                token=self.token,
                cluster=self.cluster,
                spool_dir=self.data_dir / "spool",
                spool_limits=self.spool_limits,
            ),
        )
        install_status(app, api_token=self.api_token, client_ssl=self.client_ssl)
        app.add_routes([openapi_route(RAFT_PREFIX)])
        guard = ConnectionGuard(self.connection_limits, peer_prefix=RAFT_PREFIX + "/")
        app.middlewares.append(guard.middleware)
        return app, guard

    async def serve(self, app: web.Application, guard: ConnectionGuard) -> None:
        """Listen at ``host:port`` with ``app`` (from ``build_app``) until ``stop()``."""
        self._accept_errors = AcceptErrorFilter(self.connection_limits.log_interval)
        self._accept_errors.install()
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.connection_limits.idle_timeout,
            **runner_options(),
        )
        await self._runner.setup()
        site = GuardedSite(self._runner, self.host, self.port, guard, ssl_context=self.server_ssl)
        await site.start()
        if self.port == 0:
            self.port = _bound_port(self._runner)
            app[KV_API].addr = self.addr
        app[KV_API].listen_addr = f"{self.host}:{self.port}"
        logger.info(
            "node %d serving the KV API at %s and Raft at %s%s",
            self.node_id,
            self.url,
            self.url,
            RAFT_PREFIX,
        )

    async def hand_over(self, timeout: float) -> int | None:
        """If this node leads, hand leadership to another voter; return it (None: not done).

        Called before ``stop()`` on SIGTERM: the cluster then has a leader again within a
        round trip or two, instead of waiting an election timeout for this one to be missed.
        Waits (within ``timeout``) until this node has applied what it proposed, so writes
        it accepted are answered before it goes.
        """
        raft = self._raft
        if raft is None or raft.metrics().state is not ServerState.LEADER:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        proposed = raft.metrics().last_log_index
        try:
            new_leader = await raft.transfer_leader(timeout=timeout)
            await raft.wait_for(
                lambda m: m.last_applied is not None and m.last_applied.index >= proposed,
                max(0.0, deadline - loop.time()),
                "the writes it proposed to be applied",
            )
        except (RaftHttpError, TimeoutError) as e:
            logger.warning("node %d: leadership not handed over: %s", self.node_id, e)
            return None
        return new_leader

    async def wait_fatal(self) -> str:
        """Wait until the core stops after a fatal error; answers the reason."""
        while True:
            try:
                metrics = await self.raft.wait_for_server(lambda m: m.fatal is not None, 3600.0)
            except TimeoutError:
                continue
            return metrics.fatal or "fatal error"

    async def stop(self) -> None:
        """Stop Raft first (no more RPCs), then the network's sessions, then the server."""
        raft, self._raft = self._raft, None
        network, self._network = self._network, None
        runner, self._runner = self._runner, None
        log_store, self._log_store = self._log_store, None
        if raft is not None:
            await raft.shutdown()
        await self.events.close()
        if network is not None:
            await network.close()
        if runner is not None:
            await runner.cleanup()
        if log_store is not None:
            await log_store.close()
        data_dir, self._data_dir = self._data_dir, None
        if data_dir is not None:
            await asyncio.to_thread(data_dir.release)
        if self._accept_errors is not None:
            self._accept_errors.uninstall()
            self._accept_errors = None
        logger.info("node %d stopped", self.node_id)


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the server is bound to no TCP port")
