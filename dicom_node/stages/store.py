"""Store, and the job path's only door to storage.

:class:`JobStorage` holds every call the worker and its stages make to the catalog and
the file store: claims, heartbeats, orphan recovery, the study's files, the output
files, and the job's completion with its deliveries. :class:`StoreStage` encodes and
stores the outputs the write stage yields, one at a time.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from config import Settings
from config.digest import sha256_file
from dicom_node.encode import encode
from dicom_node.selection import SeriesCandidate
from dicom_node.stages.context import JobContext, JobFacts, PendingOutput
from storage import Catalog, CatalogBusyError, FileStore
from storage.catalog import study_files
from storage.errors import LeaseLostError
from storage.jobs import (
    NewOutput,
    claim_next,
    complete_job,
    finish_job,
    heartbeat,
    job_state,
    requeue_orphans,
)
from storage.models import JobState

LOGGER = logging.getLogger(__name__)
__all__ = ["CatalogBusyError", "JobStorage", "LeaseLostError", "StoreStage", "where"]


def where(exc: BaseException, frames: int = 4) -> str:
    """Where ``exc`` was raised: the innermost ``frames`` frames as ``file:line:function``,
    without the exception text or source lines (they may quote header values)."""
    stack = traceback.extract_tb(exc.__traceback__)[-frames:]
    return (
        " < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(stack)) or "?"
    )


class JobStorage:
    """The catalog and file store as the job path uses them.

    Parameters
    ----------
    settings, catalog, store
        The process's settings (its destinations), catalog and file store.
    """

    def __init__(self, settings: Settings, catalog: Catalog, store: FileStore) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self._claims: dict[int, tuple[str, int]] = {}  # job id -> (worker, attempt)

    def claim(self, worker: str) -> JobFacts | None:
        """Claim the oldest queued job for ``worker``.

        The claim is remembered: the job's output files are named by its attempt, and
        its completion is recorded only while ``worker`` still holds it.
        """
        job = claim_next(self.catalog, worker)
        if job is None:
            return None
        self._claims[job.id] = (worker, job.attempts)
        return JobFacts.of(job)

    def release_claim(self, job_id: int) -> None:
        """Forget the claim of a job this process has finished with."""
        self._claims.pop(job_id, None)

    def heartbeat(self, job_id: int) -> bool:
        """Renew the job's lease; ``False`` when the job is no longer this worker's.

        A job this worker has already finished needs no lease: ``True``.
        """
        claim = self._claims.get(job_id)
        if claim is None:
            return True
        held = heartbeat(self.catalog, job_id, claim[0])
        return held or job_id not in self._claims  # finished meanwhile: not lost

    def requeue_orphans(self, is_alive: Callable[[str], bool]) -> list[int]:
        """Re-queue RUNNING jobs whose worker died; returns their ids."""
        return requeue_orphans(self.catalog, is_alive)

    def state(self, job_id: int) -> JobState | None:
        """A job's current state (``None``: gone)."""
        return job_state(self.catalog, job_id)

    def study_series(self, study_id: int) -> tuple[str, list[SeriesCandidate]]:
        """The study's key and its series, with the paths of their files."""
        files = study_files(self.catalog, study_id)
        root = self.store.root
        return files.study.key, [
            SeriesCandidate(
                se.series_instance_uid, [root / f.file_path for f in se.files], se.series_number
            )
            for se in files.series
        ]

    def save(self, job_id: int, out: PendingOutput) -> NewOutput:
        """Encode and store one output file of a job.

        A second or later attempt names its files ``a<N>_<name>.dcm``, so a worker that
        lost its lease but still runs never overwrites the files of the worker that took
        the job over.
        """
        ds = out.dataset
        attempt = self._claims.get(job_id, ("", 1))[1]
        name = f"{out.name}.dcm" if attempt <= 1 else f"a{attempt}_{out.name}.dcm"
        rel = self.store.write_output(job_id, name, encode(ds))
        return NewOutput(
            kind=out.kind,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            file_path=rel,
            sha256=sha256_file(self.store.root / rel),
        )

    def save_notification(self, job_id: int, body: bytes, uid: str) -> NewOutput:
        """Store a job's notification body (JSON) as its ``notification`` output.

        ``uid`` names it in the catalog (outputs are unique by it); the file is named
        like the DICOM outputs of the same attempt.
        """
        attempt = self._claims.get(job_id, ("", 1))[1]
        name = "notification.json" if attempt <= 1 else f"a{attempt}_notification.json"
        rel = self.store.write_output(job_id, name, body)
        return NewOutput(
            kind="notification",
            sop_class_uid="",
            sop_instance_uid=uid,
            series_instance_uid="",
            file_path=rel,
            sha256=sha256_file(self.store.root / rel),
        )

    def complete(
        self,
        job_id: int,
        state: JobState,
        reason: str,
        outputs: Sequence[NewOutput],
        **fields: object,
    ) -> None:
        """Record the outputs, queue their deliveries and finish the job, at once.

        The outputs go to every active destination row that takes their kind (the rows
        ``cspine serve`` made from its configuration when it started).
        """
        worker = self._claims.get(job_id, (None, 0))[0]
        complete_job(self.catalog, job_id, state, reason, outputs, None, worker=worker, **fields)
        self._claims.pop(job_id, None)  # finished: the lease ends with it

    def finish(self, job_id: int, state: JobState, reason: str) -> None:
        """Finish a job without outputs."""
        worker = self._claims.get(job_id, (None, 0))[0]
        finish_job(self.catalog, job_id, state, reason, worker=worker)
        self._claims.pop(job_id, None)


class StoreStage:
    """Encode and store each output the write stage yields.

    An error writing the SR of a job that ended early (of the types its ending
    tolerates) leaves the job without outputs; any other error propagates.
    """

    name: ClassVar[str] = "store"
    after_end: ClassVar[bool] = True

    def __call__(self, ctx: JobContext) -> None:
        tolerated = ctx.end.tolerated if ctx.end is not None else ()
        try:
            for out in ctx.pending:
                ctx.outputs.append(ctx.storage.save(ctx.job.id, out))
                del out  # the dataset goes as the write stage drops it
        except tolerated as exc:
            _sr_not_written(ctx, exc)
            ctx.outputs = []
        finally:
            ctx.pending = ()
        if ctx.end is None:
            ctx.timings["write"] = time.perf_counter() - ctx.write_started


def _sr_not_written(ctx: JobContext, exc: BaseException) -> None:
    if ctx.end is not None and ctx.end.state is JobState.FAILED:
        LOGGER.warning(
            "failed-job SR not written job_id=%d error=%s at=%s",
            ctx.job.id,
            type(exc).__name__,
            where(exc),
        )
    else:
        LOGGER.warning("not-processed SR not written job_id=%d: %s", ctx.job.id, exc)
