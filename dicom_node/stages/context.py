"""What the stages of a job pass along: one :class:`JobContext` per job.

Each stage reads what the stages before it left in the context and adds its own
part; none keeps state of its own between jobs. A stage that ends the job early (no
eligible series, an unreadable series, implausible pixels, a study the pipeline
refuses) sets :attr:`JobContext.end`; the runner then skips the remaining analysis
stages and runs write, store and complete, which record that ending.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from config import Settings
from dicom_node.result import JobResult
from dicom_node.selection import Selection, SeriesCandidate
from storage.models import JobState

if TYPE_CHECKING:
    import numpy as np
    from pydicom import Dataset

    from ai.types import CTVolume, PipelineResult
    from dicom_node.stages.store import JobStorage
    from storage.jobs import NewOutput

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFacts:
    """The claimed job, copied from the catalog's record when it is claimed."""

    id: int
    study_id: int
    version: int
    created_at: dt.datetime

    @classmethod
    def of(cls, job: Any) -> JobFacts:
        """The facts of a claimed job (any object with these attributes)."""
        return cls(int(job.id), int(job.study_id), int(job.version), job.created_at)

    @property
    def when(self) -> dt.datetime:
        """Content date/time of the job's outputs: the job's creation time, in UTC."""
        return self.created_at.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Ending:
    """How a job ends when it is not DONE: NOT_PROCESSED or FAILED.

    Attributes
    ----------
    state
        The job's final state.
    reason
        The catalog's reason (for a failed job the exception, never shown in an SR).
    sr_words
        The words of the SR's ``"not processed: <words>"``.
    send_sr
        Whether an SR is written and delivered.
    sr_name
        Names the SR's UIDs and its file (``"sr"``, or ``"failed-sr"`` so the two never
        share a SOP Instance UID); either is delivered as output kind ``"sr"``.
    tolerated
        Exceptions writing the SR that end the job without it (others propagate).
    series_uid
        The series the job looked at, if one was chosen.
    record
        The job's result record.
    """

    state: JobState
    reason: str
    sr_words: str
    send_sr: bool
    sr_name: str = "sr"
    tolerated: tuple[type[BaseException], ...] = (ValueError, TypeError)
    series_uid: str | None = None
    record: JobResult | None = None


@dataclass(frozen=True)
class PendingOutput:
    """A written output, not yet stored: its file name, delivery kind and dataset."""

    name: str
    kind: str
    dataset: Dataset


@dataclass
class JobContext:
    """Everything one job's stages hand on to each other.

    Attributes
    ----------
    job, settings, storage
        The job, the process's settings, and the only door to the catalog and file store.
    timings
        Seconds per step, as the result record states them.
    study_key
        Names the catalog's study row (Study Instance UID and the row's creation time);
        the output UIDs derive from it.
    candidates, selection
        The study's series and the selection (the chosen series keeps its headers).
    volume, result
        The CT volume (released by the write stage) and the pipeline's result.
    sources, summary_pixels, slices, geometry_issues
        What the writers need once the volume is gone: the source headers in slice
        order, the rendered summary image, and the volume's facts.
    end
        Set when the job ends NOT_PROCESSED or FAILED.
    pending, outputs
        Outputs the write stage yields (lazily, one at a time) and the store stage
        has stored.
    """

    job: JobFacts
    settings: Settings
    storage: JobStorage
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    study_key: str = ""
    candidates: list[SeriesCandidate] = field(default_factory=list)
    selection: Selection | None = None
    volume: CTVolume | None = None
    result: PipelineResult | None = None
    sources: list[Dataset] = field(default_factory=list)
    summary_pixels: np.ndarray | None = None
    slices: int = 0
    geometry_issues: list[str] = field(default_factory=list)
    end: Ending | None = None
    write_started: float = 0.0
    pending: Iterable[PendingOutput] = ()
    outputs: list[NewOutput] = field(default_factory=list)

    @property
    def series_uid(self) -> str | None:
        """Series Instance UID of the chosen series, if one was chosen."""
        chosen = self.selection.series if self.selection else None
        return None if chosen is None else chosen.series_instance_uid

    @property
    def headers(self) -> dict[Path, Dataset]:
        """Headers of the chosen series, read once by the selection."""
        chosen = self.selection.series if self.selection else None
        return {} if chosen is None else chosen.headers

    def not_processed(self, reason: str, record: JobResult | None = None) -> None:
        """End the job NOT_PROCESSED with ``reason`` (and a result record with details)."""
        self.end = Ending(
            JobState.NOT_PROCESSED,
            reason,
            sr_words=reason,
            send_sr=self.settings.selection.send_not_processed_sr,
            series_uid=self.series_uid,
            record=record or JobResult("not_processed", reason=reason),
        )

    def failed(self, reason: str, sr_words: str) -> None:
        """End the job FAILED: ``reason`` for the catalog, ``sr_words`` for the SR."""
        self.end = Ending(
            JobState.FAILED,
            reason,
            sr_words=sr_words,
            send_sr=self.settings.worker.send_failed_sr,
            sr_name="failed-sr",
            tolerated=(Exception,),
            record=JobResult.failed(self.job.id),
        )

    def release(self) -> None:
        """Drop the large parts (volume, result, headers, summary image) of a finished job."""
        self.volume = self.result = self.summary_pixels = None
        self.sources = []
        if self.selection is not None and self.selection.series is not None:
            self.selection.series.headers = {}
        self.pending = ()


class Stage(Protocol):
    """One named step of the job path."""

    name: ClassVar[str]
    after_end: ClassVar[bool]
    """Whether the stage also runs for a job that ended early (write, store, complete)."""

    def __call__(self, ctx: JobContext) -> None:
        """Run the step on ``ctx``."""
