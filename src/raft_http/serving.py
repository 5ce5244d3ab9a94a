"""Options for the aiohttp runner that serves ``raft_app`` (alone or inside a host app).

``raft_app`` answers every bad request it sees with a JSON 4xx, but some never reach
it: aiohttp's HTTP parser refuses a malformed request line, an oversized header or a
``Content-Encoding`` it cannot decode itself, and logs each refusal at ERROR with a
traceback. Anyone who can reach the port can then fill the log. Pass
``runner_options()`` to ``web.AppRunner`` (or ``web.run_app``) to keep that cheap:

- ``auto_decompress=False``: aiohttp leaves bodies as sent, so every encoding reaches
  the app, which refuses all but ``identity`` with a JSON 415 before reading a byte
  (no decompression bomb, no parser-level plain-text 400 for ``br`` or ``zstd``).
- a server logger that reports parser refusals at DEBUG, plus one WARNING line per
  client address per minute; any other error keeps its ERROR and traceback.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["ParseErrorLogger", "runner_options"]

_WARN_EVERY: Final = 60.0
_MAX_SOURCES: Final = 4096


class ParseErrorLogger(logging.Logger):
    """aiohttp's server logger, with parser refusals rate-limited per client address."""

    def __init__(self, name: str = "raft_http.http", every: float = _WARN_EVERY) -> None:
        super().__init__(name)
        self.parent = logging.getLogger("raft_http")
        self._every = every
        self._last_warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if not isinstance(exc, HttpProcessingError):
            super().exception(msg, *args, **kwargs)
            return
        source = str(args[0]) if args else "?"
        self.debug(msg, *args, **kwargs)
        now = time.monotonic()
        last = self._last_warned.get(source)
        if last is not None and now - last < self._every:
            self._suppressed[source] = self._suppressed.get(source, 0) + 1
            return
        if len(self._last_warned) >= _MAX_SOURCES:  # many sources: forget the oldest
            oldest = min(self._last_warned, key=self._last_warned.__getitem__)
            del self._last_warned[oldest]
            self._suppressed.pop(oldest, None)
        self._last_warned[source] = now
        suppressed = self._suppressed.pop(source, 0)
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        self.warning(
            "refused a malformed request from %s: %s%s",
            source,
            _one_line(exc),
            more,
        )


def _one_line(exc: HttpProcessingError) -> str:
    return " ".join(f"{exc.code} {exc.message}".split())


def runner_options() -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` that make hostile requests cheap to refuse."""
    return {"auto_decompress": False, "logger": ParseErrorLogger()}
