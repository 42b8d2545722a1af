"""Reader for the RSNA 2022 Cervical Spine Fracture Detection layout (real or synthetic).

::

    root/train.csv                        StudyInstanceUID,patient_overall,C1..C7
    root/train_bounding_boxes.csv         StudyInstanceUID,x,y,width,height,slice_number
    root/train_images/<StudyUID>/<n>.dcm
    root/segmentations/<StudyUID>.nii     (only some studies)

The volume is built by :func:`ai.volume.load_series` (slices sorted by position, never by
file name). The segmentation is put on the volume grid from the geometry, not from a
list of known-flipped studies: the NIfTI header's voxel-to-RAS matrix is compared with
the DICOM volume's voxel-to-LPS matrix; when they agree up to an axis permutation and
flips (the normal case) that mapping is applied. When the header carries no usable
orientation, the RSNA convention is assumed (NIfTI axes = image column, image row
reversed, z ascending), which is the same as the public
``seg[:, ::-1, ::-1].transpose(2, 1, 0)`` for studies stored head first, and the
DICOM z direction decides the slice order.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from ai.errors import VolumeError
from ai.types import VERTEBRAE, CTVolume
from ai.volume import load_series

logger = logging.getLogger(__name__)

PERMUTATION_TOL = 0.02
"""Maximum deviation (in voxels per voxel) from an exact signed permutation."""
TRANSLATION_TOL = 0.5
"""Maximum offset (voxels) between the NIfTI grid and the DICOM grid."""


class SegmentationAlignmentError(VolumeError):
    """A segmentation cannot be placed on its study's volume grid."""


@dataclass
class RSNAStudy:
    """One loaded study.

    Attributes
    ----------
    uid
        StudyInstanceUID.
    volume
        Axial CT volume from :func:`ai.volume.load_series`.
    segmentation
        uint8 label map aligned with ``volume.hu`` (1..7 = C1..C7, 8.. thoracic), or None.
    labels
        ``"C1".."C7"`` and ``"patient_overall"`` -> 0/1.
    instance_numbers
        InstanceNumber of each volume slice (maps ``slice_number`` of the boxes).
    boxes
        Rows of ``train_bounding_boxes.csv`` for this study.
    alignment
        How the segmentation was aligned: ``"header"``, ``"convention"`` or ``""``.
    """

    uid: str
    volume: CTVolume
    segmentation: np.ndarray | None
    labels: dict[str, int]
    instance_numbers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    boxes: list[dict] = field(default_factory=list)
    alignment: str = ""

    def slice_index(self, instance_number: int) -> int:
        """Volume slice index of an InstanceNumber (e.g. a box's ``slice_number``)."""
        hits = np.nonzero(self.instance_numbers == int(instance_number))[0]
        if hits.size != 1:
            raise KeyError(f"InstanceNumber {instance_number} is not exactly once in the series")
        return int(hits[0])


def _permutation(m: np.ndarray) -> tuple[list[int], list[int]] | None:
    """For a 3x3 matrix close to a signed permutation: source axis and sign per target axis."""
    axes, signs = [], []
    for row in m:
        a = int(np.argmax(np.abs(row)))
        if abs(abs(row[a]) - 1) > PERMUTATION_TOL or np.sum(np.abs(row)) - abs(row[a]) > (
            PERMUTATION_TOL
        ):
            return None
        axes.append(a)
        signs.append(int(np.sign(row[a])))
    if sorted(axes) != [0, 1, 2]:
        return None
    return axes, signs


def align_segmentation(
    data: np.ndarray, nifti_affine: np.ndarray | None, volume: CTVolume
) -> tuple[np.ndarray, str]:
    """Put NIfTI label data on the grid of ``volume``.

    Parameters
    ----------
    data
        The NIfTI array as stored (3D).
    nifti_affine
        The header's voxel-to-RAS matrix, or None when the header has none.
    volume
        The DICOM volume (``[slice, row, column]``, voxel-to-LPS affine).

    Returns
    -------
    (numpy.ndarray, str)
        uint8 labels with the volume's shape, and ``"header"`` or ``"convention"``.

    Raises
    ------
    SegmentationAlignmentError
        Shapes or geometry do not match.
    """
    shape = volume.hu.shape
    if data.ndim != 3:
        raise SegmentationAlignmentError(f"segmentation must be 3D, got shape {data.shape}")
    labels = np.rint(np.asarray(data)).astype(np.uint8)
    if nifti_affine is not None and np.all(np.isfinite(nifti_affine)):
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nifti_affine
        to_vol = np.linalg.inv(volume.affine) @ lps  # NIfTI voxel -> volume voxel
        perm = _permutation(to_vol[:3, :3])
        if perm is not None:
            axes, signs = perm
            out = labels.transpose(axes)
            expected_origin = []
            for t in range(3):
                if signs[t] < 0:
                    out = np.flip(out, axis=t)
                    expected_origin.append(shape[t] - 1)
                else:
                    expected_origin.append(0)
            if out.shape != shape:
                raise SegmentationAlignmentError(
                    f"segmentation shape {data.shape} does not fit volume {shape} "
                    f"after reorientation ({out.shape})"
                )
            offset = to_vol[:3, 3] - np.array(expected_origin)
            if np.max(np.abs(offset)) > TRANSLATION_TOL:
                logger.warning(
                    "segmentation header origin is %s voxels off the DICOM grid; "
                    "orientation taken from the header",
                    np.round(offset, 2).tolist(),
                )
            return np.ascontiguousarray(out), "header"
        logger.warning("segmentation header orientation is unusable; using the RSNA convention")
    # RSNA convention: (column, reversed row, ascending z)
    conv = labels[:, ::-1, :].transpose(2, 1, 0)
    if volume.affine[2, 0] < 0:  # volume slices descend in z
        conv = conv[::-1]
    if conv.shape != shape:
        raise SegmentationAlignmentError(
            f"segmentation shape {data.shape} does not fit volume {shape}"
        )
    return np.ascontiguousarray(conv), "convention"


class RSNADataset:
    """An RSNA 2022 style dataset folder.

    Parameters
    ----------
    root
        Folder with ``train.csv`` and ``train_images/``; ``segmentations/`` and
        ``train_bounding_boxes.csv`` are optional.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        train = self.root / "train.csv"
        if not train.is_file():
            raise FileNotFoundError(f"{train} is missing; an RSNA dataset root needs train.csv")
        self._labels: dict[str, dict[str, int]] = {}
        self.study_uids: list[str] = []
        with open(train, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"StudyInstanceUID", "patient_overall", *VERTEBRAE} - set(
                reader.fieldnames or []
            )
            if missing:
                raise ValueError(f"train.csv lacks columns {sorted(missing)}")
            for row in reader:
                uid = row["StudyInstanceUID"].strip()
                self.study_uids.append(uid)
                self._labels[uid] = {k: int(float(row[k])) for k in (*VERTEBRAE, "patient_overall")}
        self._boxes: dict[str, list[dict]] = {}
        bb = self.root / "train_bounding_boxes.csv"
        if bb.is_file():
            with open(bb, newline="") as f:
                for row in csv.DictReader(f):
                    self._boxes.setdefault(row["StudyInstanceUID"].strip(), []).append(
                        {
                            "x": float(row["x"]),
                            "y": float(row["y"]),
                            "width": float(row["width"]),
                            "height": float(row["height"]),
                            "slice_number": int(float(row["slice_number"])),
                        }
                    )

    def __len__(self) -> int:
        return len(self.study_uids)

    def labels(self, uid: str) -> dict[str, int]:
        """``"C1".."C7"`` and ``"patient_overall"`` of a study from ``train.csv``."""
        return dict(self._labels[uid])

    def segmentation_path(self, uid: str) -> Path | None:
        """``segmentations/<uid>.nii`` (or ``.nii.gz``) when it exists."""
        for name in (f"{uid}.nii", f"{uid}.nii.gz"):
            path = self.root / "segmentations" / name
            if path.is_file():
                return path
        return None

    def has_segmentation(self, uid: str) -> bool:
        """Whether the study has a segmentation file."""
        return self.segmentation_path(uid) is not None

    def series_files(self, uid: str) -> list[Path]:
        """The study's DICOM files (sorted by file name number; the loader re-sorts by position)."""
        folder = self.root / "train_images" / uid
        files = [p for p in folder.glob("*.dcm") if p.is_file()]
        if not files:
            raise FileNotFoundError(f"no DICOM files in {folder}")

        def key(p: Path) -> tuple[int, str]:
            return (int(p.stem), "") if p.stem.isdigit() else (1 << 30, p.name)

        return sorted(files, key=key)

    def bounding_boxes(self, uid: str) -> list[dict]:
        """Rows of ``train_bounding_boxes.csv`` for the study (x, y, width, height, slice)."""
        return [dict(b) for b in self._boxes.get(uid, [])]

    def load(self, uid: str) -> RSNAStudy:
        """Load the volume (via :func:`ai.volume.load_series`), segmentation and labels."""
        files = self.series_files(uid)
        volume = load_series(files)
        by_sop: dict[str, int] = {}
        for p in files:
            ds = pydicom.dcmread(
                p, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "InstanceNumber"]
            )
            by_sop[str(ds.SOPInstanceUID)] = int(ds.get("InstanceNumber") or 0)
        inst = np.array([by_sop.get(u, 0) for u in volume.source_sop_instance_uids], np.int32)
        seg, how = None, ""
        path = self.segmentation_path(uid)
        if path is not None:
            img = nib.load(str(path))
            if not isinstance(img, nib.Nifti1Image):  # NIfTI-2 images are Nifti1Image too
                raise ValueError(f"{path.name}: not a NIfTI image")
            code = int(img.header["sform_code"]) or int(img.header["qform_code"])
            affine = img.affine if code > 0 else None
            seg, how = align_segmentation(np.asanyarray(img.dataobj), affine, volume)
        return RSNAStudy(
            uid=uid,
            volume=volume,
            segmentation=seg,
            labels=self.labels(uid),
            instance_numbers=inst,
            boxes=self.bounding_boxes(uid),
            alignment=how,
        )
