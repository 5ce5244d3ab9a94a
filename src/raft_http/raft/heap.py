"""Hand the memory a node freed back to the OS, where the C library allows it.

CPython frees every object over 512 bytes (an entry's data, a stored value) with the C
library's ``free``, and glibc keeps what was freed in its arenas for reuse rather than
returning it: after a load's entries and values are gone, the process stays as large as
at its peak. ``malloc_trim(0)`` returns the free pages of every arena. The node calls it
after a snapshot has let it purge its log, the moment memory has just been freed in bulk
(``bench/bench_soak.py`` measures the difference). Linux with glibc only; elsewhere this
does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS; False where the C library cannot.

    Takes some milliseconds on a heap of a few hundred MB: call it from a worker thread.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
