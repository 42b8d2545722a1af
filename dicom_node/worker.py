"""The inference worker: claim a job, select the series, run the pipeline, write outputs.

It runs in its own process (``cspine worker``, started by ``cspine serve``), so a
crash or a memory spike in inference never takes the receiver down. Models are loaded
once per process. A job's outputs get SOP Instance UIDs derived from the study and
the job version, and their content time is the job's creation time: a job re-run
after a crash reproduces the same objects, and a new version gets new UIDs.
"""

from __future__ import annotations

import datetime as dt
import gc
import io
import json
import logging
import os
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import pydicom
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.uid import generate_uid
from sqlalchemy import select

from config import Settings
from config.digest import sha256_file
from dicom_node import memory
from dicom_node.selection import SeriesCandidate, select_series
from dicom_node.writers.common import blank_invalid_dates
from storage import Catalog, FileStore
from storage.jobs import NewOutput, claim_next, complete_job, finish_job, heartbeat, requeue_orphans
from storage.models import Job, JobState, Series, Study

LOGGER = logging.getLogger(__name__)
SERIES_NUMBERS = {"seg": 9001, "sr": 9002, "summary": 9003}
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


def software_version() -> str:
    """Version of the installed distribution (the writers name the product themselves)."""
    try:
        return dist_version("cspine-node")
    except Exception:
        return "0+unknown"


def worker_id() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_alive(worker: str) -> bool:
    """Whether a worker id names a live process on this host."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def output_uid(study_key: str, version: int, what: str) -> str:
    """Deterministic UID for one output of one job version.

    ``study_key`` names the catalog's study row (Study Instance UID and the row's
    creation time), so a study purged and received again never reuses old UIDs.
    """
    return generate_uid(entropy_srcs=["cspine-node", study_key, f"v{version}", what])


def _where(exc: BaseException, frames: int = 4) -> str:
    """Where ``exc`` was raised: the innermost ``frames`` frames as ``file:line:function``,
    without the exception text or source lines (they may quote header values)."""
    stack = traceback.extract_tb(exc.__traceback__)[-frames:]
    return (
        " < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(stack)) or "?"
    )


def _study_key(study: Study) -> str:
    return f"{study.study_instance_uid}/{study.created_at.isoformat()}"


def destination_kinds(settings: Settings) -> dict[str, tuple[str, ...]]:
    """``{"AE@HOST:PORT": output kinds}`` from the settings."""
    return {f"{d.ae_title}@{d.host}:{d.port}": tuple(d.outputs) for d in settings.destinations}


class _Chunks(io.RawIOBase):
    """A write-only file that keeps references to the written buffers.

    pydicom writes the Pixel Data value with one ``write`` call; a ``BytesIO`` would
    copy it in and grow by reallocation (at times two copies of a 0.3 GB SEG). Here
    the value is only referenced, and :meth:`join` copies everything once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes | memoryview] = []
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        part = data if isinstance(data, bytes) else bytes(data)
        self._parts.append(part)
        self._size += len(part)
        return len(part)

    def tell(self) -> int:
        return self._size

    def join(self) -> bytes:
        """All written bytes in one buffer; the parts are released."""
        out = b"".join(self._parts)
        self._parts.clear()
        return out


_PIXEL_DATA = 0x7FE00010


def _encode(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a DICOM file, the bytes ``ds.save_as(..., enforce_file_format=True)`` writes.

    pydicom encodes every element value into a temporary buffer and copies that out again
    (two extra copies of a SEG's Pixel Data). When Pixel Data is native, explicit VR little
    endian and the last element, the rest is encoded by pydicom and the Pixel Data element
    is appended here by reference, so the whole file costs one copy (the final join).
    """
    out = _Chunks()
    elem = ds.get(_PIXEL_DATA)
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if elem is not None and elem.VR == "OB or OW":  # as pydicom resolves it when writing
        elem = correct_ambiguous_vr_element(elem, ds, True)
    fast = (
        elem is not None
        and elem.VR in ("OB", "OW")
        and isinstance(elem.value, bytes)
        and syntax == pydicom.uid.ExplicitVRLittleEndian
        and int(max(ds.keys())) == _PIXEL_DATA
    )
    if not fast:
        ds.save_as(out, enforce_file_format=True)
        return out.join()
    del ds[_PIXEL_DATA]
    try:
        ds.save_as(out, enforce_file_format=True)
    finally:
        ds[_PIXEL_DATA] = elem
    value: bytes = elem.value
    pad = len(value) % 2
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, elem.VR.encode(), 0, len(value) + pad))
    out.write(value)
    if pad:
        out.write(b"\x00")
    return out.join()


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
        self.catalog = catalog
        self.store = store
        self.id = worker_id()
        tune_malloc()
        self._pipeline_factory = pipeline_factory or self._default_pipeline
        self._pipeline: Any = None
        self.stop_event = threading.Event()

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
        """Re-queue RUNNING jobs whose worker died."""
        ids = requeue_orphans(self.catalog, lambda w: w != self.id and is_alive(w))
        for job_id in ids:
            LOGGER.warning("job re-queued after worker death job_id=%d", job_id)
        return ids

    def run_forever(self) -> None:
        """Claim and process jobs until :attr:`stop_event` is set."""
        self.recover()
        _ = self.pipeline
        LOGGER.info("worker ready worker=%s", self.id)
        while not self.stop_event.is_set():
            if not self.run_once():
                self.stop_event.wait(self.settings.worker.poll_seconds)

    def run_once(self) -> bool:
        """Process one job if one is queued; return whether one was."""
        job = claim_next(self.catalog, self.id)
        if job is None:
            return False
        LOGGER.info(
            "job started job_id=%d study_id=%d version=%d", job.id, job.study_id, job.version
        )
        beat = threading.Event()

        def beater() -> None:
            while not beat.wait(10):
                heartbeat(self.catalog, job.id)

        thread = threading.Thread(target=beater, daemon=True)
        thread.start()
        try:
            self.process(job)
        except Exception as exc:
            # the exception text may quote header values: the log gets its type and
            # where it was raised, the catalog (cspine status / show) the full text
            LOGGER.error(
                "job failed job_id=%d error=%s at=%s", job.id, type(exc).__name__, _where(exc)
            )
            self._failed(job, f"{type(exc).__name__}: {exc}")
        finally:
            beat.set()
        return True

    def _failed(self, job: Job, reason: str) -> None:
        """Finish a job that raised as FAILED, with a not-processed SR when configured.

        The SR says only ``"internal error (job N)"``: never the exception text, which
        may quote header values. A failure while writing the SR leaves the job FAILED
        without outputs. A job the failed step had already finished keeps its state.

        Parameters
        ----------
        job
            The claimed job.
        reason
            Exception type and text, recorded in the catalog only.
        """
        with self.catalog.read() as session:
            current = session.get(Job, job.id)
            state = None if current is None else current.state
        if state is not JobState.RUNNING:
            LOGGER.warning(
                "job failed after it was finished job_id=%d state=%s",
                job.id,
                getattr(state, "value", state),
            )
            return
        outputs: list[NewOutput] = []
        if self.settings.worker.send_failed_sr:
            from ai.types import REASON_CODES

            words = f"{REASON_CODES.get('internal_error', 'internal error')} (job {job.id})"
            try:
                study, candidates, _ = self._candidates(job.study_id)
                outputs = self._not_processed_sr(
                    job,
                    study,
                    candidates,
                    words,
                    job.created_at.replace(tzinfo=dt.UTC),
                    kind="failed-sr",
                )
            except Exception as exc:  # the job stays FAILED, without the SR
                LOGGER.warning(
                    "failed-job SR not written job_id=%d error=%s at=%s",
                    job.id,
                    type(exc).__name__,
                    _where(exc),
                )
                outputs = []
        try:
            complete_job(
                self.catalog,
                job.id,
                JobState.FAILED,
                reason,
                outputs,
                destination_kinds(self.settings),
                result_json=json.dumps({"failed": "internal error", "job_id": job.id}),
            )
        except Exception as exc:
            if not outputs:
                raise
            LOGGER.warning(
                "failed-job SR not recorded job_id=%d error=%s", job.id, type(exc).__name__
            )
            finish_job(self.catalog, job.id, JobState.FAILED, reason)

    def _candidates(self, study_id: int) -> tuple[Study, list[SeriesCandidate], dict[str, Path]]:
        with self.catalog.read() as session:
            study = session.get(Study, study_id)
            assert study is not None
            cands = []
            by_uid: dict[str, Path] = {}
            for series in session.scalars(select(Series).where(Series.study_id == study_id)):
                paths = []
                for inst in series.instances:
                    path = self.store.root / inst.file_path
                    paths.append(path)
                    by_uid[inst.sop_instance_uid] = path
                cands.append(
                    SeriesCandidate(series.series_instance_uid, paths, series.series_number)
                )
            return study, cands, by_uid

    def process(self, job: Job) -> None:
        """Run one job to DONE, NOT_PROCESSED or FAILED."""
        from ai.errors import VolumeError
        from ai.volume import load_series

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        study, candidates, by_uid = self._candidates(job.study_id)
        selection = select_series(candidates, self.settings.selection)
        timings["select"] = time.perf_counter() - t0
        LOGGER.info("series selection job_id=%d note=%s", job.id, selection.note)
        when = job.created_at.replace(tzinfo=dt.UTC)
        if selection.series is None:
            self._not_processed(job, study, candidates, selection.note, when)
            return
        t1 = time.perf_counter()
        try:
            vol = load_series(selection.series.paths)
        except VolumeError as exc:
            self._not_processed(
                job,
                study,
                candidates,
                f"series cannot be read: {exc}",
                when,
                series_uid=selection.series.series_instance_uid,
            )
            return
        timings["load"] = time.perf_counter() - t1
        bad = implausible_fraction(vol.hu)
        if bad > MAX_IMPLAUSIBLE_FRACTION:
            lo, hi = PLAUSIBLE_HU
            self._not_processed(
                job,
                study,
                candidates,
                f"pixel data implausible: {bad:.0%} of voxels outside [{lo}, {hi}] HU "
                "(corrupt or mis-encoded pixel data)",
                when,
                series_uid=selection.series.series_instance_uid,
            )
            return
        result = self.pipeline.run(vol)
        timings.update({k: float(v) for k, v in result.timings.items()})
        if result.not_processed is not None:
            self._not_processed(
                job,
                study,
                candidates,
                result.not_processed,
                when,
                series_uid=selection.series.series_instance_uid,
                details={
                    "series_instance_uid": selection.series.series_instance_uid,
                    "selection": selection.note,
                    "findings": [asdict(f) for f in result.findings],
                    "models": [asdict(m) for m in result.models],
                    "timings": timings,
                },
            )
            return
        t2 = time.perf_counter()
        # Draw the summary image now, then let the volume go: it is the largest array of
        # the job (0.6 GB at 1,200 slices) and the SEG and SR need only the label map.
        summary_pixels = self._render_summary(vol, result)
        n_slices, issues = int(vol.hu.shape[0]), [i.message for i in vol.issues]
        source_uids = vol.source_sop_instance_uids
        del vol
        release_memory()
        sources = [
            blank_invalid_dates(pydicom.dcmread(by_uid[uid], stop_before_pixels=True))
            for uid in source_uids
        ]
        outputs = self._write_outputs(
            job, _study_key(study), sources, summary_pixels, result, selection.note, when
        )
        timings["write"] = time.perf_counter() - t2
        summary = {
            "series_instance_uid": selection.series.series_instance_uid,
            "selection": selection.note,
            "patient_probability": result.patient_probability,
            "threshold": self.settings.models.fracture_threshold,
            "vertebrae": [asdict(v) for v in result.vertebrae],
            "findings": [asdict(f) for f in result.findings],
            "models": [asdict(m) for m in result.models],
            "timings": timings,
            "geometry_issues": issues,
            "slices": n_slices,
            "outputs": {o.kind: o.sop_instance_uid for o in outputs},
        }
        complete_job(
            self.catalog,
            job.id,
            JobState.DONE,
            f"{sum(v.assessed for v in result.vertebrae)} vertebrae assessed",
            outputs,
            destination_kinds(self.settings),
            series_instance_uid=selection.series.series_instance_uid,
            selection_note=selection.note,
            result_json=json.dumps(summary),
        )
        del result, sources
        release_memory()
        LOGGER.info("job done job_id=%d seconds=%.2f", job.id, time.perf_counter() - t0)

    def _save(self, job: Job, kind: str, ds: pydicom.Dataset) -> NewOutput:
        rel = self.store.write_output(job.id, f"{kind}.dcm", _encode(ds))
        return NewOutput(
            kind=kind,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            file_path=rel,
            sha256=sha256_file(self.store.root / rel),
        )

    def _ids(self, study_key: str, version: int, kind: str) -> dict[str, Any]:
        return {
            "series_instance_uid": output_uid(study_key, version, f"{kind}-series"),
            "sop_instance_uid": output_uid(study_key, version, kind),
            "series_number": SERIES_NUMBERS[kind],
            "software_version": software_version(),
        }

    def _render_summary(self, vol: Any, result: Any) -> Any:
        from dicom_node import writers

        return writers.render_summary(
            vol.hu,
            vol.affine,
            result,
            threshold=self.settings.models.fracture_threshold,
            software_version=software_version(),
        )

    def _write_outputs(
        self, job, study_key, sources, summary_pixels, result, note, when
    ) -> list[NewOutput]:
        """Write and store SEG, SR and summary, one at a time, freeing each once stored."""
        from dicom_node import writers

        threshold = self.settings.models.fracture_threshold
        outputs = []
        seg = None
        if result.label_map.any():  # no whole-map boolean temporary
            seg = writers.write_seg(
                sources, result, content_datetime=when, **self._ids(study_key, job.version, "seg")
            )
            outputs.append(self._save(job, "seg", seg))
            # stored: the SR needs the SEG's identity and segments, not its frames
            del seg.PixelData
            release_memory(collect=False)
        sr = writers.write_sr(
            sources,
            seg,
            result,
            threshold=threshold,
            selection_note=note,
            content_datetime=when,
            **self._ids(study_key, job.version, "sr"),
        )
        del seg
        outputs.append(self._save(job, "sr", sr))
        del sr
        summary = writers.write_summary_image(
            sources,
            summary_pixels,
            result,
            content_datetime=when,
            **self._ids(study_key, job.version, "summary"),
        )
        outputs.append(self._save(job, "summary", summary))
        return outputs

    def _not_processed_sr(
        self,
        job: Job,
        study: Study,
        candidates: list[SeriesCandidate],
        reason: str,
        when: dt.datetime,
        kind: str = "sr",
    ) -> list[NewOutput]:
        """Write and store a not-processed SR for ``job``; ``[]`` when no source reads.

        Parameters
        ----------
        job, study, candidates
            The job, its study and the study's series.
        reason
            The words of the SR's ``"not processed: <reason>"`` comment.
        when
            Content date/time of the SR.
        kind
            Names the UIDs and the stored file: ``"sr"`` for a job that was not processed,
            ``"failed-sr"`` for one that failed, so the two never share a SOP Instance
            UID. Either is delivered as output kind ``"sr"``.
        """
        from dicom_node import writers

        source = None
        for cand in candidates:
            for path in cand.paths:
                try:
                    source = blank_invalid_dates(pydicom.dcmread(path, stop_before_pixels=True))
                    break
                except Exception:
                    continue
            if source is not None:
                break
        if source is None:
            return []
        ids = self._ids(_study_key(study), job.version, "sr")
        if kind != "sr":
            study_key = _study_key(study)
            ids["series_instance_uid"] = output_uid(study_key, job.version, f"{kind}-series")
            ids["sop_instance_uid"] = output_uid(study_key, job.version, kind)
        sr = writers.write_not_processed_sr([source], reason, content_datetime=when, **ids)
        rel = self.store.write_output(job.id, f"{kind.replace('-', '_')}.dcm", _encode(sr))
        return [
            NewOutput(
                kind="sr",
                sop_class_uid=str(sr.SOPClassUID),
                sop_instance_uid=str(sr.SOPInstanceUID),
                series_instance_uid=str(sr.SeriesInstanceUID),
                file_path=rel,
                sha256=sha256_file(self.store.root / rel),
            )
        ]

    def _not_processed(
        self, job, study, candidates, reason, when, series_uid=None, details=None
    ) -> None:
        outputs = []
        if self.settings.selection.send_not_processed_sr:
            try:
                outputs = self._not_processed_sr(job, study, candidates, reason, when)
            except (ValueError, TypeError) as exc:
                LOGGER.warning("not-processed SR not written job_id=%d: %s", job.id, exc)
        complete_job(
            self.catalog,
            job.id,
            JobState.NOT_PROCESSED,
            reason,
            outputs,
            destination_kinds(self.settings),
            series_instance_uid=series_uid,
            selection_note=reason,
            result_json=json.dumps({"not_processed": reason, **(details or {})}),
        )
        LOGGER.info("job not processed job_id=%d", job.id)
