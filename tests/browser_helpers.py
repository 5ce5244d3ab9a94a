"""A headless Debian ``chromium`` driven over the DevTools protocol (a websocket, aiohttp).

No browser download and no node dependencies: the flags are the ones known to work on
these machines (no sandbox as root, no background networking, an empty profile).
``Chromium.find()`` is None when the browser is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

try:
    from .cluster_helpers import free_ports
except ImportError:
    from cluster_helpers import free_ports  # type: ignore[no-redef]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-allow-origins=*",
    "--window-size=1100,520",
]


class Chromium:
    """One browser with one page; ``async with Chromium(path) as page: await page.goto(url)``."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.profile = Path(tempfile.mkdtemp(prefix="raft-http-chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    @staticmethod
    def find() -> str | None:
        return shutil.which("chromium") or shutil.which("chromium-browser")

    async def __aenter__(self) -> Chromium:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _start(self) -> None:
        (port,) = free_ports(1)
        self.proc = subprocess.Popen(
            [
                self.executable,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-address=127.0.0.1",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        targets: list[dict[str, Any]] = []
        for _ in range(200):  # up to ~20 s for the browser to listen
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = [t for t in await resp.json() if t.get("type") == "page"]
                if targets:
                    break
            await asyncio.sleep(0.1)
        if not targets:
            raise RuntimeError("chromium did not open its DevTools port")
        self.ws = await self.session.ws_connect(
            targets[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024**2
        )
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command and its result (events in between are skipped)."""
        assert self.ws is not None
        call_id = next(self._ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        async with asyncio.timeout(20):
            while True:
                message = await self.ws.receive_json()
                if message.get("id") == call_id:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    result: dict[str, Any] = message.get("result", {})
                    return result

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)
