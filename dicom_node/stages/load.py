"""Load: the chosen series as a CT volume, and a check that its pixels are plausible."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from dicom_node.stages.context import JobContext

PLAUSIBLE_HU = (-3100, 4000)
"""HU range of real CT voxels, air and scanner padding (-3024, -2048) included."""
MAX_IMPLAUSIBLE_FRACTION = 0.05
"""Above this fraction of voxels outside :data:`PLAUSIBLE_HU` the pixels are garbage."""
_SLAB = 16
"""Slices scanned at once by :func:`implausible_fraction`."""


def implausible_fraction(hu: Any) -> float:
    """Fraction of voxels outside :data:`PLAUSIBLE_HU`.

    Compressed pixel data can decode without error into garbage (a corrupt JPEG
    lossless stream); real CT keeps nearly all voxels in this range. Counted slab by
    slab along the first axis, so the boolean temporaries stay a few MB however large
    the volume (three whole-volume masks would be 0.9 GB at 1,200 slices of 512x512).
    """
    import numpy as np

    lo, hi = PLAUSIBLE_HU
    if hu.size == 0:
        return 0.0
    outside = 0
    for start in range(0, hu.shape[0], _SLAB):
        slab = hu[start : start + _SLAB]
        outside += int(np.count_nonzero(slab < lo)) + int(np.count_nonzero(slab > hi))
    return float(outside) / float(hu.size)


class LoadStage:
    """Build the volume from the selection's headers; an unreadable series or garbage
    pixels end the job."""

    name: ClassVar[str] = "load"
    after_end: ClassVar[bool] = False

    def __call__(self, ctx: JobContext) -> None:
        from ai import volume
        from ai.errors import VolumeError

        assert ctx.selection is not None and ctx.selection.series is not None
        t0 = time.perf_counter()
        try:
            vol = volume.load_series(ctx.selection.series.paths, headers=ctx.headers)
        except VolumeError as exc:
            ctx.not_processed(f"series cannot be read: {exc}")
            return
        ctx.timings["load"] = time.perf_counter() - t0
        bad = implausible_fraction(vol.hu)
        if bad > MAX_IMPLAUSIBLE_FRACTION:
            lo, hi = PLAUSIBLE_HU
            ctx.not_processed(
                f"pixel data implausible: {bad:.0%} of voxels outside [{lo}, {hi}] HU "
                "(corrupt or mis-encoded pixel data)"
            )
            return
        ctx.volume = vol
