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
    """

    hu: np.ndarray
    affine: np.ndarray
    source_sop_instance_uids: list[str] = field(default_factory=list)
    issues: list[GeometryIssue] = field(default_factory=list)
    lossy: bool = False

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


@dataclass(frozen=True)
class VertebraResult:
    """Stage-2 verdict for one vertebra.

    ``probability`` is ``None`` exactly when ``assessed`` is false; ``reason`` then says why.
    """

    label: str
    visible: bool
    assessed: bool
    probability: float | None
    reason: str | None = None


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
    """

    label_map: np.ndarray
    vertebrae: list[VertebraResult]
    patient_probability: float | None
    models: list[ModelIdentity]
    timings: dict[str, float] = field(default_factory=dict)
