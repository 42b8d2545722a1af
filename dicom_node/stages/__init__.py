"""The job path as named stages: select -> load -> infer -> write -> store -> complete.

Each stage is a small object with a ``name`` that reads and extends one
:class:`~dicom_node.stages.context.JobContext` (in the manner of MONAI Deploy's
operators, without its graph machinery: the path is a straight line).

=========  ===================================  =====================================
stage      module                               does
=========  ===================================  =====================================
select     :mod:`dicom_node.stages.select`      the study's series; the one to analyse
                                                (its headers read once, kept)
load       :mod:`dicom_node.stages.load`        the CT volume from those headers; HU
                                                plausibility
infer      :mod:`dicom_node.stages.infer`       the two-stage pipeline
write      :mod:`dicom_node.stages.write`       summary image drawn, volume released;
                                                SEG, SR, summary (or a not-processed SR)
store      :mod:`dicom_node.stages.store`       each output encoded and stored; the only
                                                door to storage (:class:`JobStorage`)
complete   :mod:`dicom_node.stages.complete`    final state, outputs, deliveries and the
                                                result record, in one transaction
=========  ===================================  =====================================

A stage that ends the job early (NOT_PROCESSED) sets ``ctx.end``; the analysis stages
after it are skipped, and write, store and complete record the ending. A job that
raised runs write, store and complete as FAILED (:func:`run_failed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ai.types import REASON_CODES
from dicom_node.stages.complete import CompleteStage
from dicom_node.stages.context import JobContext, JobFacts, Stage
from dicom_node.stages.infer import InferStage
from dicom_node.stages.load import LoadStage
from dicom_node.stages.select import SelectStage
from dicom_node.stages.store import JobStorage, StoreStage
from dicom_node.stages.write import WriteStage
from storage.models import JobState

LOGGER = logging.getLogger(__name__)

ENDING = (WriteStage(), StoreStage(), CompleteStage())
"""The stages that record a job's outcome (run for every job, failed ones included)."""


def job_path(pipeline: Callable[[], Any]) -> tuple[Stage, ...]:
    """The stages of one job, in order; ``pipeline`` returns the loaded pipeline."""
    return (SelectStage(), LoadStage(), InferStage(pipeline), *ENDING)


def run(ctx: JobContext, stages: Sequence[Stage]) -> None:
    """Run ``stages`` in order; after ``ctx.end`` is set only those that record it."""
    for stage in stages:
        if ctx.end is None or stage.after_end:
            LOGGER.debug("stage %s job_id=%d", stage.name, ctx.job.id)
            stage(ctx)


def run_failed(ctx: JobContext, reason: str) -> None:
    """Finish a job that raised as FAILED, with a not-processed SR when configured.

    The SR says only ``"internal error (job N)"``: never the exception text, which may
    quote header values. A failure while writing the SR leaves the job FAILED without
    outputs. A job the failed step had already finished keeps its state.

    Parameters
    ----------
    ctx
        The job's context, as the failed stage left it.
    reason
        Exception type and text, recorded in the catalog only.
    """
    state = ctx.storage.state(ctx.job.id)
    if state is not JobState.RUNNING:
        LOGGER.warning(
            "job failed after it was finished job_id=%d state=%s",
            ctx.job.id,
            getattr(state, "value", state),
        )
        return
    ctx.release()  # what the failed stage held goes before the SR is written
    ctx.outputs = []
    words = f"{REASON_CODES.get('internal_error', 'internal error')} (job {ctx.job.id})"
    ctx.failed(reason, words)
    run(ctx, ENDING)


__all__ = [
    "ENDING",
    "JobContext",
    "JobFacts",
    "JobStorage",
    "Stage",
    "job_path",
    "run",
    "run_failed",
]
