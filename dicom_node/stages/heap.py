"""The worker's glibc settings, and handing freed memory back between stages."""

from __future__ import annotations

import gc

from dicom_node import memory

MMAP_THRESHOLD_BYTES = 16 << 20
"""Allocations from this size up get their own mapping, returned to the OS when freed."""
TRIM_THRESHOLD_BYTES = 64 << 20
"""Free memory kept at the top of the heap before glibc gives it back on its own."""


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at 16 MiB and its trim threshold at 64 MiB.

    By default glibc raises its mmap threshold each time a large mapped block is freed
    (up to 32 MiB); blocks of that size then come from the heap, and freed heap blocks
    below a live one are not returned. Stage 1 used to resample the volume in slabs of
    about 30 MB, and a 1,200-slice job left 1.2 GB of freed but resident heap behind.
    Fixed thresholds turn that adjustment off: the volume, the label map and other
    blocks of 16 MiB or more are unmapped when freed, and the heap reuses the smaller
    per-slab blocks (a trim threshold as low as the default 128 kB would hand them back
    and fault them in again on every slab). :func:`release_memory` trims the rest
    between stages. Returns whether glibc accepted both settings.
    """
    return memory.tune_malloc(
        mmap_threshold=MMAP_THRESHOLD_BYTES, trim_threshold=TRIM_THRESHOLD_BYTES
    )


def release_memory(collect: bool = True) -> None:
    """Collect garbage (unless ``collect`` is false) and hand the freed heap back to the OS.

    Small blocks (the SEG's 32 kB frames, pydicom elements) live in glibc's arenas;
    freed, they stay resident until trimmed and would add to the next stage's peak.
    ``malloc_trim(0)`` returns the free pages of every arena. Elsewhere than glibc
    this only collects garbage. A collection walks every live object (0.5 s with a
    1,200-slice SEG's 8,400 frame items alive), so it is skipped where reference
    counting alone frees what matters.
    """
    if collect:
        gc.collect()
    memory.trim_malloc()
