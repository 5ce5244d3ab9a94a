"""HTTP writers against the KV API of node processes, and RSS probes of those processes.

Shared by the cluster benches that load the nodes the way clients do
(``bench_overload.py``, ``bench_soak.py``): each writer follows 307s to the leader and,
on a refusal (a 503, a timeout, a lost connection), counts its kind and waits
``backoff`` before trying again, so a shedding leader sees the load it asked for.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

JSON = {"Content-Type": "application/json"}


def rss_mb(pid: int) -> float:
    """A process's resident set size in MB (VmRSS from /proc; NaN if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


class RssSampler:
    """Samples each process's RSS every ``interval`` seconds in a thread, with the time."""

    def __init__(self, pids: dict[int, int], interval: float = 0.5) -> None:
        self.pids = pids
        self.interval = interval
        self.started = time.monotonic()
        self.times: list[float] = []
        """Seconds since the sampler was made, one per round of samples."""
        self.samples: dict[int, list[float]] = {n: [] for n in pids}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """Take one round of samples now; returns its position in ``times``."""
        with self._lock:
            self.times.append(time.monotonic() - self.started)
            for node, pid in self.pids.items():
                self.samples[node].append(rss_mb(pid))
            return len(self.times) - 1

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _kind(answer: bytes) -> str:
    m = re.search(rb'"kind":\s*"([a-z_]+)"', answer)
    return m.group(1).decode() if m else "?"


class Load:
    """``writers`` clients of ``POST /write``, spread over the nodes at ``addrs`` at first.

    ``answers`` counts the answers by status and error kind (``"200"`` for a success);
    ``latencies`` holds the seconds each acknowledged write took (its last attempt).
    """

    def __init__(
        self,
        addrs: dict[int, str],
        writers: int,
        *,
        value_size: int,
        keys: int,
        backoff: float,
    ) -> None:
        nodes = list(addrs)
        self.urls = [f"http://{addrs[nodes[w % len(nodes)]]}/write" for w in range(writers)]
        self.writers = writers
        self.keys = keys
        self.backoff = backoff
        self.value = b"v" * value_size
        self.latencies: list[float] = []
        self.answers: collections.Counter[str] = collections.Counter()

    async def run(self, seconds: float) -> None:
        """Write values over the key space (so live data stays bounded) for ``seconds``."""
        stop_at = time.monotonic() + seconds

        async def writer(session: aiohttp.ClientSession, w: int) -> None:
            i = w
            while time.monotonic() < stop_at:
                body = b'{"Set":{"key":"k%d","value":"%s"}}' % (i % self.keys, self.value)
                if await self._post(session, w, body):
                    i += self.writers

        await self._clients(writer)

    async def delete_all(self, timeout: float) -> None:
        """Delete every key of the key space once, retrying refusals for up to ``timeout``."""
        deadline = time.monotonic() + timeout

        async def writer(session: aiohttp.ClientSession, w: int) -> None:
            for key in range(w, self.keys, self.writers):
                body = b'{"Delete":{"key":"k%d"}}' % key
                while not await self._post(session, w, body):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"key k{key} was not deleted within {timeout:g}s")

        await self._clients(writer)

    async def _clients(
        self, writer: Callable[[aiohttp.ClientSession, int], Awaitable[None]]
    ) -> None:
        connector = aiohttp.TCPConnector(limit=self.writers)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(writer(session, w) for w in range(self.writers)))

    async def _post(self, session: aiohttp.ClientSession, w: int, body: bytes) -> bool:
        """One attempt: True once acknowledged; False to try again (after a 307 at once)."""
        started = time.monotonic()
        kind = "error"
        try:
            async with session.post(
                self.urls[w], data=body, headers=JSON, allow_redirects=False
            ) as resp:
                answer = await resp.read()
                if resp.status == 200:
                    self.latencies.append(time.monotonic() - started)
                    self.answers["200"] += 1
                    return True
                if resp.status == 307:
                    self.urls[w] = resp.headers["Location"]
                    return False
                kind = f"{resp.status} {_kind(answer)}"
        except (aiohttp.ClientError, TimeoutError) as e:
            kind = type(e).__name__
        self.answers[kind] += 1
        await asyncio.sleep(self.backoff)
        return False
