"""Data shapes exchanged between the AI package and its callers.

Array convention everywhere in ``ai``: a volume is indexed ``[slice, row, column]``
(k, j, i) and its ``affine`` maps voxel indices ``(k, j, i, 1)`` to patient
coordinates in millimetres, DICOM LPS, exactly as :class:`highdicom.Volume` does.
Slices are ordered by position along the slice normal, ascending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

VERTEBRAE: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
"""Label names; label value ``n`` in a label map is ``VERTEBRAE[n - 1]``."""


@dataclass(frozen=True)
class GeometryIssue:
    """A geometry problem found while building a volume.

    Attributes
    ----------
    code
        Stable machine-readable code, e.g. ``"duplicate_positions"``, ``"uneven_spacing"``,
        ``"gantry_tilt"``, ``"non_axial"``, ``"mixed_dimensions"``, ``"lossy_compression"``.
    message
        One-line human description.
    """

    code: str
    message: str


@dataclass(frozen=True)
class SeriesFacts:
    """Acquisition facts of a series that the intended-use gate checks (``None``: unknown).

    Attributes
    ----------
    slice_thickness
        Nominal reconstructed slice thickness in mm (the largest over the slices).
    convolution_kernel
        Reconstruction kernel name(s) as the scanner wrote them, joined by ``\\``.
    contrast_agent
        Contrast/bolus agent when the header names one, ``""`` when it says none.
    body_part
        Body Part Examined as written (not trusted for anatomy, only reported).
    """

    slice_thickness: float | None = None
    convolution_kernel: str | None = None
    contrast_agent: str | None = None
    body_part: str | None = None


@dataclass
class CTVolume:
    """A CT series as an int16 HU volume with its geometry.

    Attributes
    ----------
    hu
        int16 array ``[slice, row, column]`` of Hounsfield units.
    affine
        4x4 float64 voxel-to-patient (LPS, mm) matrix.
    source_sop_instance_uids
        SOP Instance UID of each slice, in slice order (empty for non-DICOM sources).
    issues
        Geometry problems that were tolerated (warnings).
    lossy
        Whether any slice was lossy-compressed.
    facts
        Acquisition facts from the headers (all unknown for non-DICOM sources).
    """

    hu: np.ndarray
    affine: np.ndarray
    source_sop_instance_uids: list[str] = field(default_factory=list)
    issues: list[GeometryIssue] = field(default_factory=list)
    lossy: bool = False
    facts: SeriesFacts = field(default_factory=SeriesFacts)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along (slice, row, column)."""
        return tuple(float(np.linalg.norm(self.affine[:3, a])) for a in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelIdentity:
    """Identity of a model package as written into outputs."""

    name: str
    version: str
    sha256: str
    description: str
    demo: bool = False


REASON_CODES: dict[str, str] = {
    "not_in_fov": "not in the field of view",
    "too_small": "too little of it in the field of view",
    "outside_intended_use": "input outside intended use",
    "implausible": "segmentation implausible",
    "ood": "input unlike the training data",
    "no_cervical_spine": "no cervical spine found",
    "internal_error": "internal error",
}
"""Why a vertebra or a study was not assessed: stable code -> the words outputs lead with."""

INCOMPLETE_CODES = frozenset({"ood", "implausible"})
"""Refusals of a vertebra in view that leave a patient-level "no fracture" incomplete."""


@dataclass(frozen=True)
class VertebraResult:
    """Stage-2 verdict for one vertebra.

    ``probability`` is ``None`` exactly when ``assessed`` is false; ``reason`` then says why
    in words (``"input outside intended use (slice thickness 3.0 mm > 1.25 mm)"``) and
    ``reason_code`` is its key in :data:`REASON_CODES`. ``ood_score`` is the stage-2
    out-of-distribution score of the crop when one was computed.
    """

    label: str
    visible: bool
    assessed: bool
    probability: float | None
    reason: str | None = None
    reason_code: str | None = None
    ood_score: float | None = None


@dataclass(frozen=True)
class Finding:
    """A study-level check that failed: why a stage did not assess (some of) the study.

    Attributes
    ----------
    code
        Key in :data:`REASON_CODES` (``"outside_intended_use"``, ``"implausible"``, ...).
    stage
        ``"stage1"`` or ``"stage2"``: the stage the check guards.
    check
        Stable name of the check (``"slice_thickness"``, ``"consecutive_levels"``, ...).
    message
        The measured value against its limit, in words.
    """

    code: str
    stage: str
    check: str
    message: str

    @property
    def text(self) -> str:
        """``"<reason words> (<message>)"``, as outputs show it."""
        return f"{REASON_CODES.get(self.code, self.code)} ({self.message})"


@dataclass
class PipelineResult:
    """Everything :func:`ai.pipeline.run` returns for one series.

    Attributes
    ----------
    label_map
        uint8 array on the source grid (same shape as the input volume), 0 background,
        1..7 = C1..C7.
    vertebrae
        One :class:`VertebraResult` per label C1..C7, in order.
    patient_probability
        Probability of any cervical fracture, or ``None`` when nothing could be assessed.
    models
        Identities of the models that produced the result.
    timings
        Seconds spent per stage (e.g. ``"stage1"``, ``"stage2"``).
    findings
        Study-level checks that failed (intended use, plausibility), in the order run.
    not_processed
        Set when the study as a whole cannot be answered (e.g. ``"no cervical spine
        found"``): the node then delivers a NOT_PROCESSED SR with this reason, and no SEG.
    """

    label_map: np.ndarray
    vertebrae: list[VertebraResult]
    patient_probability: float | None
    models: list[ModelIdentity]
    timings: dict[str, float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    not_processed: str | None = None

    @property
    def incomplete(self) -> list[VertebraResult]:
        """Vertebrae in view that were refused (unlike the training data, implausible).

        A patient probability below the threshold does not cover them: outputs then say
        "incomplete" instead of "no fracture". (Levels out of view, or cut to a sliver by
        its edge, are not counted.)
        """
        return [v for v in self.vertebrae if not v.assessed and v.reason_code in INCOMPLETE_CODES]
