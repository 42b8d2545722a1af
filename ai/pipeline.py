"""One entry point for both stages: a CT volume in, a :class:`~ai.types.PipelineResult` out.

It knows nothing of DICOM networking or the catalog. Load a :class:`Pipeline` once per
worker process and call :meth:`Pipeline.run` per series, or call the module-level
:func:`run`, which loads the default packages (``seg-demo``, ``cls-demo``) once and caches
them for the life of the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ai import plausibility
from ai.cls import ClsModel
from ai.errors import InferenceError, ModelLoadError
from ai.intended_use import IntendedUse, from_package
from ai.types import REASON_CODES, VERTEBRAE, CTVolume, Finding, PipelineResult, VertebraResult

log = logging.getLogger(__name__)

DEFAULT_SEG = "seg-demo"
DEFAULT_CLS = "cls-demo"


NO_CERVICAL_SPINE = REASON_CODES["no_cervical_spine"]


@dataclass(frozen=True)
class GateConfig:
    """How the pipeline guards its stages (a site's settings, passed down).

    Attributes
    ----------
    intended_use
        Check each stage's intended use before it runs.
    plausibility
        Check the stage-1 label map against cervical anatomy before stage 2.
    stage1, stage2
        Narrower limits than the packages state (see
        :meth:`ai.intended_use.IntendedUse.narrowed`).
    plausibility_limits
        Site values for the scalar plausibility limits (see :func:`ai.plausibility.limits_from`).
    """

    intended_use: bool = True
    plausibility: bool = True
    stage1: Mapping[str, Any] = field(default_factory=dict)
    stage2: Mapping[str, Any] = field(default_factory=dict)
    plausibility_limits: Mapping[str, Any] = field(default_factory=dict)


def _package_use(
    meta: Mapping[str, Any], stage: str, narrower: Mapping[str, Any]
) -> IntendedUse | None:
    try:
        use = from_package(meta, stage)
        if use is None:
            if narrower:
                raise ValueError(f"the {stage} package states no intended use to narrow")
            return None
        return use.narrowed(narrower)
    except ValueError as exc:
        raise ModelLoadError(f"{stage} intended use: {exc}") from exc


class Pipeline:
    """Stage 1 (segmentation) followed by stage 2 (fracture probabilities), each gated.

    Before stage 1 the volume is checked against stage 1's intended use; its label map is
    checked for anatomical plausibility; before stage 2 the volume is checked against
    stage 2's intended use. Whatever a check refuses is reported, never guessed: see
    :meth:`run`.
    """

    def __init__(self, seg: Any, cls: ClsModel, gate: GateConfig | None = None) -> None:
        self.seg = seg
        self.cls = cls
        self.gate = gate or GateConfig()
        seg_meta = getattr(getattr(seg, "package", None), "meta", {}) or {}
        cls_meta = getattr(cls, "meta", {}) or {}
        self.stage1_use = _package_use(seg_meta, "stage1", self.gate.stage1)
        self.stage2_use = _package_use(cls_meta, "stage2", self.gate.stage2)
        try:
            self.limits = plausibility.limits_from(self.gate.plausibility_limits)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc

    @staticmethod
    def load(
        seg: str | Path = DEFAULT_SEG,
        cls: str | Path = DEFAULT_CLS,
        registry: str | Path | None = None,
        device: str = "auto",
        gate: GateConfig | None = None,
    ) -> Pipeline:
        """Load both model packages.

        Parameters
        ----------
        seg
            Stage-1 package folder or name.
        cls
            Stage-2 package folder or name.
        registry
            Folder of installed packages (``None``: the shipped ``ai/models``).
        device
            ``"auto"``, ``"cpu"`` or ``"cuda"``.
        gate
            The site's gate settings (``None``: every check on, the packages' limits).

        Raises
        ------
        ModelLoadError
            When a package is missing, corrupted or of the wrong kind, or a site limit
            would widen a package's intended use.
        """
        from ai.seg import SegModel

        seg_model = SegModel.load(seg, registry=registry, device=device)
        cls_model = ClsModel.load(cls, registry=registry, device=device)
        return Pipeline(seg_model, cls_model, gate)

    def run(self, vol: CTVolume) -> PipelineResult:
        """Gate, segment, check, crop and classify one volume.

        * Outside stage 1's intended use: nothing runs; the result is not processed with
          the reason (every limit broken, measured value against limit).
        * Stage 1 finds no plausible cervical spine: not processed, "no cervical spine
          found", with the failed check; the label map is emptied.
        * A vertebra that fails a plausibility check is removed from the label map and
          not assessed, "segmentation implausible (...)".
        * Outside stage 2's intended use: the plausible vertebrae keep their labels (the
          SEG is still delivered) and are all not assessed with the reason.

        Returns
        -------
        PipelineResult
            Label map on the source grid, C1..C7 verdicts, patient probability (``None``
            when nothing was assessed), both model identities, study-level findings,
            ``not_processed`` when the study as a whole was not answered, and the
            seconds spent in ``gate``, ``stage1`` and ``stage2``.

        Raises
        ------
        InferenceError
            When stage 1 returns a label map that does not fit the volume.
        """
        gate = self.gate
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        findings: list[Finding] = []
        if gate.intended_use and self.stage1_use is not None:
            findings += self.stage1_use.check(vol)
        if findings:
            timings["gate"] = time.perf_counter() - t0
            reason = "; ".join(f.text for f in findings)
            return self._not_assessed(vol, findings, reason, "outside_intended_use", timings)
        t1 = time.perf_counter()
        seg_out = self.seg.predict(vol)
        label_map = np.asarray(seg_out.label_map)
        if label_map.shape != vol.hu.shape:
            raise InferenceError(
                f"stage 1 label map {label_map.shape} does not match volume {vol.hu.shape}"
            )
        label_map = label_map.astype(np.uint8, copy=False)
        t2 = time.perf_counter()
        timings["stage1"] = t2 - t1
        rejected: dict[str, Finding] = {}
        if gate.plausibility:
            verdict = plausibility.check(vol, label_map, self.limits)
            found = [v for v in VERTEBRAE if v in verdict.stats]
            if verdict.study is not None or not found or len(verdict.rejected) == len(found):
                why = verdict.study or next(iter(verdict.rejected.values()), None)
                findings += verdict.findings
                reason = NO_CERVICAL_SPINE if why is None else f"{NO_CERVICAL_SPINE}: {why.text}"
                timings["gate"] = time.perf_counter() - t2 + (t1 - t0)
                return self._not_assessed(vol, findings, reason, "no_cervical_spine", timings)
            rejected = verdict.rejected
            findings += verdict.findings
            for name in rejected:
                label_map[label_map == VERTEBRAE.index(name) + 1] = 0
        stage2_findings: list[Finding] = []
        if gate.intended_use and self.stage2_use is not None:
            stage2_findings = self.stage2_use.check(vol)
        findings += stage2_findings
        t3 = time.perf_counter()
        timings["gate"] = (t1 - t0) + (t3 - t2)
        if stage2_findings:
            text = "; ".join(f.text for f in stage2_findings)
            present = {int(v) for v in np.unique(label_map) if v}
            verdicts = [
                VertebraResult(name, True, False, None, text, "outside_intended_use")
                if i + 1 in present
                else VertebraResult(
                    name, False, False, None, "not in the field of view", "not_in_fov"
                )
                for i, name in enumerate(VERTEBRAE)
            ]
            patient: float | None = None
        else:
            verdicts, patient = self.cls.predict(vol, label_map)
        for i, v in enumerate(verdicts):
            if v.label in rejected:
                verdicts[i] = VertebraResult(
                    v.label, True, False, None, rejected[v.label].text, "implausible"
                )
        t4 = time.perf_counter()
        timings["stage2"] = t4 - t3
        if not any(v.assessed for v in verdicts):
            patient = None
        log.info(
            "pipeline gate=%.2fs stage1=%.2fs stage2=%.2fs assessed=%d findings=%s",
            timings["gate"],
            timings["stage1"],
            timings["stage2"],
            sum(v.assessed for v in verdicts),
            ",".join(f"{f.stage}:{f.check}" for f in findings) or "none",
        )
        return PipelineResult(
            label_map=label_map,
            vertebrae=verdicts,
            patient_probability=patient,
            models=[self.seg.identity, self.cls.identity],
            timings=timings,
            findings=findings,
        )

    def _not_assessed(
        self,
        vol: CTVolume,
        findings: list[Finding],
        reason: str,
        code: str,
        timings: dict[str, float],
    ) -> PipelineResult:
        """A result for a study not answered at all: empty label map, every level not assessed."""
        log.info(
            "pipeline not processed code=%s findings=%s",
            code,
            ",".join(f"{f.stage}:{f.check}" for f in findings) or "none",
        )
        return PipelineResult(
            label_map=np.zeros(vol.hu.shape, dtype=np.uint8),
            vertebrae=[VertebraResult(n, False, False, None, reason, code) for n in VERTEBRAE],
            patient_probability=None,
            models=[self.seg.identity, self.cls.identity],
            timings={"stage1": 0.0, "stage2": 0.0, **timings},
            findings=findings,
            not_processed=reason,
        )


_default: Pipeline | None = None
_lock = threading.Lock()


def default_pipeline() -> Pipeline:
    """The process-wide pipeline with the default packages (loaded on first use)."""
    global _default
    with _lock:
        if _default is None:
            _default = Pipeline.load()
        return _default


def run(volume: CTVolume) -> PipelineResult:
    """Run the default pipeline on a volume (see :func:`default_pipeline`)."""
    return default_pipeline().run(volume)
