"""The result record of a job: what the worker stores in ``result_json``, and reads back.

One typed model, :class:`JobResult`, is both written (the complete stage,
:mod:`dicom_node.stages.complete`) and read (``cspine results``,
:func:`dicom_node.jobs.result_lines`). The JSON is the one the worker has always
written, so rows of earlier versions read as well:

- processed: ``series_instance_uid``, ``selection``, ``patient_probability``,
  ``threshold``, ``vertebrae``, ``findings``, ``models``, ``timings``,
  ``geometry_issues``, ``slices``, ``outputs``;
- not processed: ``not_processed`` (the reason), and when the pipeline itself refused
  the study also ``series_instance_uid``, ``selection``, ``findings``, ``models``,
  ``timings``;
- failed: ``failed`` (always ``"internal error"``) and ``job_id``.

Vertebrae, findings and models are the :mod:`ai.types` records the pipeline returns.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from ai.types import Finding, ModelIdentity, VertebraResult

Outcome = Literal["done", "not_processed", "failed"]
_T = TypeVar("_T")


def _record(cls: type[_T], item: Any) -> _T:
    """``cls`` from a stored dict: unknown keys are dropped, missing ones read as ``None``
    (or the field's default)."""
    data = item if isinstance(item, Mapping) else {}
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = None
    return cls(**kwargs)


@dataclass(frozen=True)
class JobResult:
    """The stored result of one job.

    Attributes
    ----------
    outcome
        ``"done"``, ``"not_processed"`` or ``"failed"``.
    reason
        Why a study was not processed (``None`` for the others).
    job_id
        The job, stated by a failed job's record only.
    series_instance_uid, selection
        The series analysed and the selection note. ``None`` in the record of a study
        not processed before the pipeline ran.
    patient_probability, threshold
        The patient-level probability (``None``: not assessed) and the threshold the
        verdicts use (processed studies only).
    vertebrae, findings, models, timings
        What the pipeline returned, and the seconds per step.
    geometry_issues, slices
        The volume's geometry issues (words) and its number of slices.
    outputs
        SOP Instance UID of each output kind.
    """

    outcome: Outcome
    reason: str | None = None
    job_id: int | None = None
    series_instance_uid: str | None = None
    selection: str | None = None
    patient_probability: float | None = None
    threshold: float | None = None
    vertebrae: tuple[VertebraResult, ...] = ()
    findings: tuple[Finding, ...] = ()
    models: tuple[ModelIdentity, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    geometry_issues: tuple[str, ...] = ()
    slices: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def failed(cls, job_id: int) -> JobResult:
        """The record of a job that raised (it never states the exception)."""
        return cls("failed", reason="internal error", job_id=job_id)

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON object (keys as the worker has always written them)."""
        if self.outcome == "failed":
            return {"failed": self.reason, "job_id": self.job_id}
        details = {
            "series_instance_uid": self.series_instance_uid,
            "selection": self.selection,
            "findings": [asdict(f) for f in self.findings],
            "models": [asdict(m) for m in self.models],
            "timings": dict(self.timings),
        }
        if self.outcome == "not_processed":
            head: dict[str, Any] = {"not_processed": self.reason}
            return head if self.series_instance_uid is None else {**head, **details}
        return {
            "series_instance_uid": self.series_instance_uid,
            "selection": self.selection,
            "patient_probability": self.patient_probability,
            "threshold": self.threshold,
            "vertebrae": [asdict(v) for v in self.vertebrae],
            "findings": details["findings"],
            "models": details["models"],
            "timings": details["timings"],
            "geometry_issues": list(self.geometry_issues),
            "slices": self.slices,
            "outputs": dict(self.outputs),
        }

    def to_json(self) -> str:
        """The ``result_json`` column's text."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | None) -> JobResult:
        """Read a ``result_json`` column (any version the worker wrote; ``None`` or
        ``"{}"`` reads as a processed record without values)."""
        data = json.loads(text or "{}")
        if not isinstance(data, dict):
            raise ValueError("a job result is a JSON object")
        if "failed" in data:
            return cls("failed", reason=data["failed"], job_id=data.get("job_id"))
        threshold = data.get("threshold")
        return cls(
            "not_processed" if "not_processed" in data else "done",
            reason=data.get("not_processed"),
            series_instance_uid=data.get("series_instance_uid"),
            selection=data.get("selection"),
            patient_probability=data.get("patient_probability"),
            threshold=None if threshold is None else float(threshold),
            vertebrae=tuple(_record(VertebraResult, v) for v in data.get("vertebrae") or ()),
            findings=tuple(_record(Finding, f) for f in data.get("findings") or ()),
            models=tuple(_record(ModelIdentity, m) for m in data.get("models") or ()),
            timings={str(k): float(v) for k, v in (data.get("timings") or {}).items()},
            geometry_issues=tuple(str(i) for i in data.get("geometry_issues") or ()),
            slices=data.get("slices"),
            outputs={str(k): str(v) for k, v in (data.get("outputs") or {}).items()},
        )
