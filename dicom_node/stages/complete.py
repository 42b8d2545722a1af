"""Complete: the job's final state, outputs, deliveries and result record, at once."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, ClassVar

from dicom_node import notify
from dicom_node.result import JobResult
from dicom_node.stages.context import JobContext
from dicom_node.stages.heap import release_memory
from dicom_node.uids import output_uid
from storage.models import JobState

if TYPE_CHECKING:
    from storage.jobs import NewOutput

LOGGER = logging.getLogger(__name__)


class CompleteStage:
    """Finish the job DONE, NOT_PROCESSED or FAILED with its outputs and result record."""

    name: ClassVar[str] = "complete"
    after_end: ClassVar[bool] = True

    def __call__(self, ctx: JobContext) -> None:
        if ctx.end is None:
            _done(ctx)
        elif ctx.end.state is JobState.FAILED:
            _failed(ctx)
        else:
            _not_processed(ctx)


def _done(ctx: JobContext) -> None:
    result, selection = ctx.result, ctx.selection
    assert result is not None and selection is not None
    record = JobResult(
        "done",
        series_instance_uid=ctx.series_uid,
        selection=selection.note,
        patient_probability=result.patient_probability,
        threshold=ctx.settings.models.fracture_threshold,
        vertebrae=tuple(result.vertebrae),
        findings=tuple(result.findings),
        models=tuple(result.models),
        timings=ctx.timings,
        geometry_issues=tuple(ctx.geometry_issues),
        slices=ctx.slices,
        outputs={o.kind: o.sop_instance_uid for o in ctx.outputs},
    )
    ctx.storage.complete(
        ctx.job.id,
        JobState.DONE,
        f"{sum(v.assessed for v in result.vertebrae)} vertebrae assessed",
        [*ctx.outputs, *_notification(ctx, record)],
        series_instance_uid=ctx.series_uid,
        selection_note=selection.note,
        result_json=record.to_json(),
    )
    del result
    ctx.release()
    release_memory()
    LOGGER.info("job done job_id=%d seconds=%.2f", ctx.job.id, time.perf_counter() - ctx.started)


def _not_processed(ctx: JobContext) -> None:
    end = ctx.end
    assert end is not None and end.record is not None
    ctx.storage.complete(
        ctx.job.id,
        JobState.NOT_PROCESSED,
        end.reason,
        [*ctx.outputs, *_notification(ctx, end.record)],
        series_instance_uid=end.series_uid,
        selection_note=end.reason,
        result_json=end.record.to_json(),
    )
    ctx.release()
    LOGGER.info("job not processed job_id=%d", ctx.job.id)


def _notification(ctx: JobContext, record: JobResult) -> list[NewOutput]:
    """The job's notification output (a positive finding, or a study not processed
    when so configured), or nothing."""
    identifiers: dict[str, str] = {}
    if ctx.sources:
        head = ctx.sources[0]
        for key in ("StudyInstanceUID", "AccessionNumber", "PatientID"):
            identifiers[key] = str(head.get(key, ""))
    body = notify.body_for(ctx.settings, ctx.job.id, ctx.job.study_id, record, identifiers)
    if body is None:
        return []
    uid = output_uid(ctx.study_key, ctx.job.version, "notification")
    LOGGER.info("notification queued job_id=%d study_id=%d", ctx.job.id, ctx.job.study_id)
    return [ctx.storage.save_notification(ctx.job.id, body, uid)]


def _failed(ctx: JobContext) -> None:
    """A failure while recording the SR leaves the job FAILED without outputs."""
    end = ctx.end
    assert end is not None and end.record is not None
    try:
        ctx.storage.complete(
            ctx.job.id,
            JobState.FAILED,
            end.reason,
            ctx.outputs,
            result_json=end.record.to_json(),
        )
    except Exception as exc:
        if not ctx.outputs:
            raise
        LOGGER.warning(
            "failed-job SR not recorded job_id=%d error=%s", ctx.job.id, type(exc).__name__
        )
        ctx.storage.finish(ctx.job.id, JobState.FAILED, end.reason)
    ctx.release()
