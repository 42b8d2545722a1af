"""The inference worker: claim a job, run its stages, keep its heartbeat.

It runs in its own process (``cspine worker``, started by ``cspine serve`` or on its
own on any host that reaches the catalog and the shared store), so a crash or a memory
spike in inference never takes the receiver down. Models are loaded once per process.
The job itself is the stage sequence of :mod:`dicom_node.stages` (select -> load ->
infer -> write -> store -> complete); this module keeps the claim loop, the heartbeat
and the recovery of jobs whose worker died.

A claim is a lease: the heartbeat renews it every :data:`HEARTBEAT_SECONDS`, and every
worker, on every host, re-queues the jobs whose lease went stale
(:data:`RECOVER_SECONDS` apart), so the job of a worker killed on one host is taken
over by a worker of another. A worker that finds its lease gone (its job re-queued
while it hung) records nothing for that job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from config import Settings
from dicom_node import stages
from dicom_node.liveness import known_dead, worker_id
from dicom_node.stages import JobContext, JobFacts, JobStorage
from dicom_node.stages.heap import tune_malloc
from dicom_node.stages.store import CatalogBusyError, LeaseLostError, where
from storage import Catalog, FileStore

LOGGER = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 10
"""Seconds between two heartbeats of a running job."""
RECOVER_SECONDS = 30.0
"""Seconds between two looks for jobs whose worker died (on any host)."""


class Worker:
    """Process jobs from the catalog.

    Parameters
    ----------
    settings, catalog, store
        The process's settings, catalog and file store.
    pipeline_factory
        Builds the AI pipeline once (defaults to the configured model packages).
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        store: FileStore,
        pipeline_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.storage = JobStorage(settings, catalog, store)
        self.id = worker_id()
        tune_malloc()
        self._pipeline_factory = pipeline_factory or self._default_pipeline
        self._pipeline: Any = None
        self.stages = stages.job_path(lambda: self.pipeline)
        self.stop_event = threading.Event()
        self.lease_lost = threading.Event()
        self._last_recover = float("-inf")

    def _default_pipeline(self) -> Any:
        from ai.pipeline import GateConfig, Pipeline

        models, gate = self.settings.models, self.settings.gate
        return Pipeline.load(
            seg=models.seg_model,
            cls=models.cls_model,
            registry=models.registry or None,
            device=models.device,
            gate=GateConfig(
                intended_use=gate.intended_use,
                plausibility=gate.plausibility,
                stage1=gate.stage1,
                stage2=gate.stage2,
                plausibility_limits=gate.plausibility_limits,
            ),
        )

    @property
    def pipeline(self) -> Any:
        """The pipeline, loaded on first use and kept for the life of the process."""
        if self._pipeline is None:
            t0 = time.perf_counter()
            self._pipeline = self._pipeline_factory()
            LOGGER.info("models loaded seconds=%.2f", time.perf_counter() - t0)
        return self._pipeline

    def recover(self) -> list[int]:
        """Re-queue RUNNING jobs whose worker died: known dead on this host (or this very
        id, left by an earlier process), or silent past the stale limit on any host."""
        ids = self.storage.requeue_orphans(lambda w: w != self.id and not known_dead(w))
        self._last_recover = time.monotonic()  # after it ran: a failed look is retried
        for job_id in ids:
            LOGGER.warning("job re-queued after worker death job_id=%d", job_id)
        return ids

    def run_forever(self) -> None:
        """Claim and process jobs until :attr:`stop_event` is set.

        Dead workers' jobs are re-queued first and then every :data:`RECOVER_SECONDS`;
        while the catalog is unreachable the worker waits and claims nothing.
        """
        _ = self.pipeline
        LOGGER.info("worker ready worker=%s", self.id)
        while not self.stop_event.is_set():
            try:
                if time.monotonic() - self._last_recover >= RECOVER_SECONDS:
                    self.recover()
                busy = self.run_once()
            except CatalogBusyError as exc:
                # the catalog (PostgreSQL) is unreachable: claim nothing until it is back
                LOGGER.warning("catalog unavailable, worker waiting: %s", exc)
                busy = False
            if not busy:
                self.stop_event.wait(self.settings.worker.poll_seconds)

    def run_once(self) -> bool:
        """Process one job if one is queued; return whether one was."""
        job = self.storage.claim(self.id)
        if job is None:
            return False
        LOGGER.info(
            "job started job_id=%d study_id=%d version=%d", job.id, job.study_id, job.version
        )
        beat = threading.Event()
        self.lease_lost.clear()
        thread = threading.Thread(target=self._beat, args=(job.id, beat), daemon=True)
        thread.start()
        try:
            self.process(job)
        finally:
            beat.set()
            self.storage.release_claim(job.id)
        return True

    def _beat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                held = self.storage.heartbeat(job_id)
            except Exception as exc:  # the catalog is away for a while: try again
                LOGGER.warning("heartbeat failed job_id=%d error=%s", job_id, type(exc).__name__)
                continue
            if not held:
                LOGGER.warning("job lease lost job_id=%d (re-queued elsewhere)", job_id)
                self.lease_lost.set()
                return

    def process(self, job: JobFacts) -> None:
        """Run one job's stages to DONE, NOT_PROCESSED or FAILED.

        A job whose lease was lost (another worker holds it now) ends here with nothing
        recorded; that worker's result is the job's.
        """
        ctx = JobContext(job, self.settings, self.storage)
        try:
            try:
                stages.run(ctx, self.stages)
            except LeaseLostError:
                raise
            except Exception as exc:
                # the exception text may quote header values: the log gets its type and
                # where it was raised, the catalog (cspine status / show) the full text
                LOGGER.error(
                    "job failed job_id=%d error=%s at=%s", job.id, type(exc).__name__, where(exc)
                )
                stages.run_failed(ctx, f"{type(exc).__name__}: {exc}")
        except LeaseLostError:
            LOGGER.warning("job result dropped job_id=%d: lease lost to another worker", job.id)


__all__ = ["Worker"]
