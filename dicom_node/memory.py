"""glibc malloc tuning shared by the receiver (``cspine serve``) and the worker.

Both processes free large blocks (PDUs and delivered outputs in the receiver; volumes,
slabs and SEG frames in the worker) that glibc would otherwise keep resident: it raises
its mmap threshold after each large free (up to 32 MiB), so later blocks of that size
come from the heap, and freed heap pages stay until trimmed. Each process fixes the
thresholds once at start (:func:`tune_malloc`) and trims at quiet points
(:func:`trim_malloc`). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

LOGGER = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""``mallopt`` parameter numbers of glibc (``malloc.h``)."""

_LIBC: Any = None


def _libc() -> Any:
    """glibc through ctypes, or ``False`` where there is none."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                _LIBC = libc
            except (OSError, AttributeError):
                pass
    return _LIBC


def tune_malloc(*, mmap_threshold: int, trim_threshold: int, arena_max: int | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds (and optionally cap its arenas).

    Parameters
    ----------
    mmap_threshold
        Blocks of this many bytes and more get their own mapping, returned to the system
        when freed; fixing it also stops glibc from raising it after large frees.
    trim_threshold
        Free bytes kept at the top of a heap before glibc returns them on its own.
    arena_max
        Maximum number of malloc arenas (each thread may otherwise get its own).

    Returns
    -------
    bool
        Whether glibc accepted every setting (``False`` elsewhere than glibc).
    """
    libc = _libc()
    if not libc:
        return False
    settings = [(M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)]
    if arena_max is not None:
        settings.append((M_ARENA_MAX, arena_max))
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    LOGGER.debug("malloc tuned ok=%s", ok)
    return ok


def trim_malloc() -> None:
    """Return the free pages of every arena to the system (``malloc_trim(0)``)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
