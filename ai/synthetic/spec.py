"""What a synthetic study looks like: the :class:`StudySpec` knobs and the result types."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ai.types import CTVolume

FRACTURE_KINDS: tuple[str, ...] = ("body_break", "arch_break", "dens_break", "compression")
"""Fracture kinds the generator draws.

``body_break``: a cortical break line through a vertebral body, one fragment displaced;
``arch_break``: a break through a pedicle/lamina (C1: through the anterior or posterior arch);
``dens_break``: a transverse break through the base of the dens (C2 only);
``compression``: an anterior wedge with loss of body height and a sclerotic band (C3..T).
"""

FIELDS_OF_VIEW: tuple[str, ...] = ("full", "no_skull", "c1_c5")
"""``full``: skull base to T2; ``no_skull``: starts just above C1 (skull base cut off);
``c1_c5``: skull base to the C5/C6 disc."""

LABEL_NAMES: dict[int, str] = {
    1: "C1", 2: "C2", 3: "C3", 4: "C4", 5: "C5", 6: "C6", 7: "C7",
    8: "T1", 9: "T2", 10: "T3", 11: "T4",
    20: "skull", 21: "mandible",
}  # fmt: skip
"""Label codes of :attr:`SyntheticStudy.labels` (RSNA numbering for 1..19).

Codes 20 (occipital bone / skull) and 21 (mandible) are not RSNA codes: the RSNA writer
stores them as 0."""

SKULL_LABEL = 20
MANDIBLE_LABEL = 21


@dataclass(frozen=True)
class StudySpec:
    """Parameters of :func:`ai.synthetic.generate_study` (every field has a default).

    Ranges are ``(low, high)`` tuples sampled uniformly from the study seed; a fixed value
    is a range with ``low == high``. ``"random"`` choices are drawn from the seed too.

    Attributes
    ----------
    rows, cols
        Image size in pixels (512x512 by default; small studies such as 96x96 are cheap).
    n_slices
        Number of axial slices. ``None``: derived from the field of view and a slice
        spacing drawn from ``slice_spacing``. Given: the spacing is the field of view
        divided by ``n_slices``, clipped to ``slice_spacing`` (the coverage then grows or
        shrinks around the spine).
    fov_mm
        In-plane field of view; pixel spacing is ``fov / cols`` (the default gives 0.25 to
        0.70 mm at 512 columns).
    slice_spacing
        Range of the spacing between slice centres in mm.
    field_of_view
        ``"full"``, ``"no_skull"``, ``"c1_c5"`` (see :data:`FIELDS_OF_VIEW`) or ``"random"``.
    patient_position
        ``"HFS"``, ``"FFS"`` or ``"random"``; sets ImageOrientationPatient as scanners do.
    instance_order
        ``"superior_first"`` (InstanceNumber 1 at the top, as in most RSNA studies),
        ``"inferior_first"`` or ``"random"``.
    fracture_rate
        Probability that a study has at least one fracture.
    vertebra_fracture_rate
        Mean fraction of C1..C7 fractured in a fractured study (at least one always is).
    fracture_kinds
        Kinds allowed (subset of :data:`FRACTURE_KINDS`).
    noise_hu
        Standard deviation of the image noise (bone kernel).
    blur
        Apply the mild partial-volume blur around the spine.
    extra_series
        Also build a scout (localizer) and a soft-tissue-kernel reconstruction.
    """

    rows: int = 512
    cols: int = 512
    n_slices: int | None = None
    fov_mm: tuple[float, float] = (128.0, 358.0)
    slice_spacing: tuple[float, float] = (0.5, 1.25)
    field_of_view: str = "random"
    patient_position: str = "random"
    instance_order: str = "random"
    fracture_rate: float = 0.5
    vertebra_fracture_rate: float = 0.2
    fracture_kinds: tuple[str, ...] = FRACTURE_KINDS
    noise_hu: float = 25.0
    blur: bool = True
    extra_series: bool = False

    def __post_init__(self) -> None:
        if not (16 <= self.rows <= 2048 and 16 <= self.cols <= 2048):
            raise ValueError(f"rows and cols must be within 16..2048, got {self.rows}x{self.cols}")
        if self.n_slices is not None and not 8 <= self.n_slices <= 4000:
            raise ValueError(f"n_slices must be None or within 8..4000, got {self.n_slices}")
        for name in ("fov_mm", "slice_spacing"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high")
        if self.fov_mm[0] < 60:
            raise ValueError("fov_mm must be at least 60 mm so that the spine fits")
        if self.field_of_view not in (*FIELDS_OF_VIEW, "random"):
            raise ValueError(f"field_of_view must be one of {(*FIELDS_OF_VIEW, 'random')}")
        if self.patient_position not in ("HFS", "FFS", "random"):
            raise ValueError("patient_position must be 'HFS', 'FFS' or 'random'")
        if self.instance_order not in ("superior_first", "inferior_first", "random"):
            raise ValueError(
                "instance_order must be 'superior_first', 'inferior_first' or 'random'"
            )
        if not 0.0 <= self.fracture_rate <= 1.0:
            raise ValueError("fracture_rate must be within 0..1")
        if not 0.0 <= self.vertebra_fracture_rate <= 1.0:
            raise ValueError("vertebra_fracture_rate must be within 0..1")
        bad = set(self.fracture_kinds) - set(FRACTURE_KINDS)
        if bad or not self.fracture_kinds:
            raise ValueError(f"fracture_kinds must be a non-empty subset of {FRACTURE_KINDS}")
        if not 0.0 <= self.noise_hu <= 200.0:
            raise ValueError("noise_hu must be within 0..200")

    @classmethod
    def small(cls, **overrides: object) -> StudySpec:
        """A cheap preset for tests and training: 96x96x80, 120..170 mm FOV, C1..T2-ish.

        Parameters
        ----------
        **overrides
            Any field to change, e.g. ``fracture_rate=1.0``.
        """
        base: dict[str, object] = {
            "rows": 96,
            "cols": 96,
            "n_slices": 80,
            "fov_mm": (120.0, 170.0),
            "slice_spacing": (1.5, 3.0),
            "noise_hu": 20.0,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


@dataclass
class Fracture:
    """One fracture with its truth.

    Attributes
    ----------
    vertebra
        ``"C1"`` .. ``"C7"``.
    kind
        One of :data:`FRACTURE_KINDS`.
    boxes
        Axial boxes ``(x, y, width, height, slice_number)`` in pixels of the stored image
        (x = column, y = row of the top-left corner) on every slice where the fracture is
        visible; ``slice_number`` is the InstanceNumber, as in RSNA's
        ``train_bounding_boxes.csv``.
    displacement_mm
        Fragment displacement (break lines) in mm; 0 for compressions.
    height_loss
        Fraction of anterior body height lost (compressions); 0 otherwise.
    """

    vertebra: str
    kind: str
    boxes: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    displacement_mm: float = 0.0
    height_loss: float = 0.0


@dataclass
class ExtraSeries:
    """An additional series of the same study (scout or soft-tissue kernel).

    Attributes
    ----------
    name
        ``"scout"`` or ``"soft_tissue"``.
    hu
        int16 ``[slice, row, column]`` (a scout has one slice).
    affine
        Voxel-to-LPS matrix (for the scout: of its single image plane).
    kernel
        ConvolutionKernel.
    image_type
        ImageType values.
    slice_thickness
        SliceThickness in mm.
    description
        SeriesDescription.
    series_uid
        SeriesInstanceUID.
    series_number
        SeriesNumber.
    """

    name: str
    hu: np.ndarray
    affine: np.ndarray
    kernel: str
    image_type: tuple[str, ...]
    slice_thickness: float
    description: str
    series_uid: str
    series_number: int


@dataclass
class SyntheticStudy:
    """A generated study and its truth (see :func:`ai.synthetic.generate_study`).

    Attributes
    ----------
    seed, spec
        What produced it.
    volume
        Bone-kernel axial series as :class:`ai.types.CTVolume` (int16 HU, slices ascending
        along the slice normal, exactly as :func:`ai.volume.load_series` returns the
        written series); ``source_sop_instance_uids`` are the SOP Instance UIDs that
        :func:`ai.synthetic.write_series` writes (the RSNA writer uses RSNA-style ones).
    labels
        uint8, same shape: 0 background, 1..7 = C1..C7, 8..11 = T1..T4, 20 = skull,
        21 = mandible (:data:`LABEL_NAMES`). Labels are exactly the bone voxels of each structure
        (fracture gaps are 0).
    fractures
        :class:`Fracture` list.
    vertebra_fractured
        ``"C1".."C7"`` -> 0/1.
    patient_overall
        1 when any vertebra is fractured.
    visible
        ``"C1".."C7"`` -> at least half of the vertebra's height is in the field of view.
    coverage
        ``"C1".."C7"`` -> fraction of the vertebra's height inside the field of view.
    instance_numbers
        InstanceNumber of each volume slice.
    """

    seed: int
    spec: StudySpec
    volume: CTVolume
    labels: np.ndarray
    fractures: list[Fracture]
    vertebra_fractured: dict[str, int]
    patient_overall: int
    visible: dict[str, bool]
    coverage: dict[str, float]
    field_of_view: str
    patient_position: str
    instance_numbers: np.ndarray
    slice_thickness: float
    kernel: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    extra_series: list[ExtraSeries] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape ``(slices, rows, columns)``."""
        slices, rows, cols = self.volume.hu.shape
        return slices, rows, cols
