"""The result table of ``cspine results``, from a job's typed result record."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from ai.types import INCOMPLETE_CODES, Finding, VertebraResult
from dicom_node.result import JobResult
from storage import Catalog
from storage import jobs as storage_jobs
from storage.records import JobInfo


def _verdict(p: float | None, threshold: float, vertebra: VertebraResult | None) -> str:
    if p is None:
        reason = (vertebra.reason if vertebra else None) or "no reason given"
        return f"not assessed: {reason}"
    return "FRACTURE" if p >= threshold else "no fracture"


def _finding_lines(findings: Sequence[Finding]) -> Iterator[str]:
    for f in findings:
        yield f"check failed ({f.stage}, {f.check}): {f.message}"


def _patient_word(record: JobResult, threshold: float) -> str:
    patient = record.patient_probability
    if patient is None:
        return "not assessed: " + (
            "; ".join(f"{f.stage} {f.message}" for f in record.findings if f.stage == "stage2")
            or "no vertebra could be assessed"
        )
    refused = [v for v in record.vertebrae if not v.assessed and v.reason_code in INCOMPLETE_CODES]
    if refused and patient < threshold:
        return "incomplete: no fracture in the assessed levels; " + ", ".join(
            f"{v.label} not assessed" for v in refused
        )
    return _verdict(patient, threshold, None)


def record_lines(record: JobResult) -> Iterator[str]:
    """The result table of one job's result record (without its job line)."""
    if record.outcome == "not_processed":
        yield f"not processed: {record.reason}"
        yield from _finding_lines(record.findings)
        return
    yield f"series: {record.series_instance_uid}"
    yield f"selection: {record.selection}"
    threshold = math.nan if record.threshold is None else record.threshold
    yield f"{'VERTEBRA':<9} {'ASSESSED':<9} {'PROBABILITY':>11}  RESULT"
    for v in record.vertebrae:
        prob = "-" if v.probability is None else f"{v.probability:.3f}"
        flag = "yes" if v.assessed else "no"
        yield f"{v.label:<9} {flag:<9} {prob:>11}  {_verdict(v.probability, threshold, v)}"
    patient = record.patient_probability
    word = _patient_word(record, threshold)
    yield f"{'patient':<9} {'':<9} {('-' if patient is None else f'{patient:.3f}'):>11}  {word}"
    yield f"threshold: {record.threshold}"
    yield from _finding_lines(record.findings)
    for m in record.models:
        demo = "  [synthetic demo weights, not for clinical use]" if m.demo else ""
        yield f"model: {m.name} {m.version} sha256 {(m.sha256 or '')[:12]}{demo}"
    yield "timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in record.timings.items())


def job_result_lines(finished: JobInfo | None, newest: JobInfo | None = None) -> Iterator[str]:
    """The result table of ``finished``, the newest DONE or NOT_PROCESSED job of a study
    (``None``: none yet, and ``newest`` is the study's newest job, if any).

    Jobs are read by attribute (``id``, ``version``, ``state``, ``result_json``): the
    catalog's job records.
    """
    if finished is None:
        state = newest.state.value if newest else "no job"
        yield f"no result yet ({state})"
        return
    yield f"job {finished.id} version {finished.version}: {finished.state.value}"
    yield from record_lines(JobResult.from_json(finished.result_json))


def result_lines(catalog: Catalog, study_id: int) -> Iterator[str]:
    """The result table of the newest finished job of a study (``cspine results``)."""
    finished = storage_jobs.latest_job(catalog, study_id, storage_jobs.FINISHED)
    newest = None if finished else storage_jobs.latest_job(catalog, study_id)
    yield from job_result_lines(finished, newest)
