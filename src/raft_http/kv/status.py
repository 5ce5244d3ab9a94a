"""``GET /`` (the live status page) and ``GET /cluster-status`` (its data), on every node.

The page is one self-contained HTML file (no build step, no external assets): it polls
``/cluster-status`` once a second and redraws a row per member. If the node that served it
goes away, it asks the other members it knows (their ``/cluster-status``, allowed
cross-origin when the API has no token). With an API token, the page itself is open (it
holds no data) and asks for the token, kept in the tab's ``sessionStorage``.

``/cluster-status`` is ``KVClient.cluster_status()`` run by the node: every member's
metrics, asked in parallel with a short deadline, so one dead member costs at most that.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from importlib import resources
from typing import Final

from aiohttp import hdrs, web

from ..types import encode_json
from .api import KV_API, base_url, error_response
from .client import KVClient, KVError

STATUS_CLIENT: Final = web.AppKey("status_client", KVClient)
PAGE: Final = resources.files(__package__).joinpath("status.html").read_bytes()


def install_status(
    app: web.Application,
    *,
    api_token: str | None,
    client_ssl: ssl.SSLContext | None = None,
    member_timeout: float = 1.5,
) -> None:
    """Add ``GET /`` and ``GET /cluster-status`` to a ``kv_api`` app."""
    cors = {} if api_token else {"Access-Control-Allow-Origin": "*"}

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            body=PAGE,
            content_type="text/html",
            charset="utf-8",
            headers={hdrs.CACHE_CONTROL: "no-store"},
        )

    async def cluster_status(request: web.Request) -> web.Response:
        client = request.app[STATUS_CLIENT]
        api = request.app[KV_API]
        client.urls = [base_url(api.addr, api.scheme)]
        try:
            status = await client.cluster_status()
        except KVError as e:
            return error_response(503, e.kind, str(e), headers=cors)
        return web.Response(
            body=encode_json(status),
            content_type="application/json",
            headers={**cors, hdrs.CACHE_CONTROL: "no-store"},
        )

    async def client_lifetime(app: web.Application) -> AsyncIterator[None]:
        api = app[KV_API]
        client = KVClient(
            base_url(api.addr, api.scheme),
            token=api_token,
            ssl=client_ssl,
            deadline=member_timeout * 2,
            request_timeout=member_timeout,
            unreachable_rounds=1,
        )
        app[STATUS_CLIENT] = client
        yield
        await client.close()

    app.cleanup_ctx.append(client_lifetime)
    app.router.add_get("/", page)
    app.router.add_get("/cluster-status", cluster_status)
