"""Infer: the two-stage pipeline on the volume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from dicom_node.result import JobResult
from dicom_node.stages.context import JobContext


class InferStage:
    """Run the pipeline; a study it refuses ends the job with the pipeline's details.

    Parameters
    ----------
    pipeline
        Returns the process's pipeline (loaded once, on first use).
    """

    name: ClassVar[str] = "infer"
    after_end: ClassVar[bool] = False

    def __init__(self, pipeline: Callable[[], Any]) -> None:
        self._pipeline = pipeline

    def __call__(self, ctx: JobContext) -> None:
        assert ctx.volume is not None and ctx.selection is not None
        result = self._pipeline().run(ctx.volume)
        ctx.timings.update({k: float(v) for k, v in result.timings.items()})
        if result.not_processed is not None:
            ctx.not_processed(
                result.not_processed,
                JobResult(
                    "not_processed",
                    reason=result.not_processed,
                    series_instance_uid=ctx.series_uid,
                    selection=ctx.selection.note,
                    findings=tuple(result.findings),
                    models=tuple(result.models),
                    timings=ctx.timings,
                ),
            )
            return
        ctx.result = result
