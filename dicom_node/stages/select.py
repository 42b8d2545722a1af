"""Select: the study's series from the catalog, and the one to analyse.

The selection reads every header of the study once (no pixel data) and keeps those of
the chosen series on it; the load stage builds the volume from them and the write
stage hands them to the writers.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

from dicom_node.selection import select_series
from dicom_node.stages.context import JobContext

LOGGER = logging.getLogger(__name__)


class SelectStage:
    """Read the study's series and choose one; no eligible series ends the job."""

    name: ClassVar[str] = "select"
    after_end: ClassVar[bool] = False

    def __call__(self, ctx: JobContext) -> None:
        t0 = time.perf_counter()
        ctx.study_key, ctx.candidates = ctx.storage.study_series(ctx.job.study_id)
        ctx.selection = select_series(ctx.candidates, ctx.settings.selection)
        ctx.timings["select"] = time.perf_counter() - t0
        LOGGER.info("series selection job_id=%d note=%s", ctx.job.id, ctx.selection.note)
        if ctx.selection.series is None:
            ctx.not_processed(ctx.selection.note)
