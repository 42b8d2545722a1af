"""Write synthetic studies in the layout of the RSNA 2022 Cervical Spine Fracture dataset.

Layout under ``root``::

    train.csv                         StudyInstanceUID,patient_overall,C1,...,C7
    train_bounding_boxes.csv          StudyInstanceUID,x,y,width,height,slice_number
    train_images/<StudyUID>/<InstanceNumber>.dcm
    segmentations/<StudyUID>.nii      (only for a subset of studies, as in RSNA)
    synthetic_manifest.json           (not in RSNA: provenance, seeds and truth)

Header quirks reproduced from a real RSNA file (``test1.dcm``): the dataset has no
Modality, no SOPClassUID (only MediaStorageSOPClassUID in the file meta), no Frame of
Reference UID, no dates other than ContentDate/Time, no SliceLocation; PatientName and
PatientID are the study number; Series UID = ``<study>.1``, SOP UID = ``<study>.1.<n>``;
the file meta has no group length; pixels are signed 16-bit with intercept 0.

Segmentation NIfTI convention (as the RSNA files, which need
``seg[:, ::-1, ::-1].transpose(2, 1, 0)`` to line up with the slices sorted from head to
feet): data axes are (image column, image row reversed, slice position ascending in z),
and the header's affine (RAS, sform and qform code 1) describes exactly that, so a reader
can use the header instead of the convention. Labels: 1..7 = C1..C7, 8.. = T1..; the
skull and mandible codes of the generator (20, 21) are written as 0.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from ai.synthetic.dicom_writer import TRANSFER_SYNTAXES, _ds, orientation_of, write_slices
from ai.synthetic.spec import SyntheticStudy
from ai.types import VERTEBRAE

logger = logging.getLogger(__name__)

RSNA_IMPLEMENTATION = ("1.2.40.0.13.1.1.1", "PYDICOM 2.3.0")
"""File-meta implementation of the real RSNA files."""

MANIFEST_NAME = "synthetic_manifest.json"
"""Provenance file written next to the layout: marks the dataset as synthetic (trainers use
it to label their models as demo models) and lists each study's seed and truth."""

MIXED_SYNTAXES: tuple[str, ...] = ("explicit", "jpeg-lossless", "j2k-lossless")
"""Choices for ``transfer_syntax="mixed"``: study seed modulo 3 picks one."""


def segmentation_nifti(
    labels: np.ndarray, affine: np.ndarray, max_code: int = 19
) -> nib.Nifti1Image:
    """The RSNA-convention NIfTI image of a label map on a volume grid.

    Parameters
    ----------
    labels
        uint8 ``[slice, row, column]`` aligned with a volume whose voxel-to-LPS matrix
        is ``affine`` (:mod:`ai.types` convention). Codes above ``max_code`` are written
        as 0.
    affine
        The volume's 4x4 voxel-to-LPS matrix.
    max_code
        Highest code kept: 19 (T12) for generator v1, whose codes 20 and 21 are the skull
        and mandible; 24 (L5) for generator v2 (``SyntheticStudyV2.rsna_max_code``).
    """
    S, R, _ = labels.shape
    data = np.where(labels > max_code, 0, labels).astype(np.uint8).transpose(2, 1, 0)[:, ::-1, :]
    step_k, step_j, step_i = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    origin = affine[:3, 3] + (R - 1) * step_j
    if step_k[2] < 0:  # slices must ascend in z along the third NIfTI axis
        data = data[:, :, ::-1]
        origin = origin + (S - 1) * step_k
        step_k = -step_k
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = step_i, -step_j, step_k, origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    img = nib.Nifti1Image(np.ascontiguousarray(data), ras)
    img.header.set_xyzt_units("mm")
    img.set_sform(ras, code=1)
    img.set_qform(ras, code=1)
    return img


def manifest_entry(study: SyntheticStudy, **extra: object) -> dict:
    """One study's provenance for :data:`MANIFEST_NAME` (seed, spec, geometry, truth)."""
    return {
        "StudyInstanceUID": study.study_uid,
        "seed": study.seed,
        "spec": dataclasses.asdict(study.spec),
        "shape": list(study.shape),
        "spacing_mm": [round(v, 5) for v in study.volume.spacing],
        "field_of_view": study.field_of_view,
        "patient_position": study.patient_position,
        "patient_overall": study.patient_overall,
        "fractures": [
            {
                "vertebra": f.vertebra,
                "kind": f.kind,
                "boxes": len(f.boxes),
                "displacement_mm": f.displacement_mm,
                "height_loss": f.height_loss,
            }
            for f in study.fractures
        ],
        **getattr(study, "manifest_extra", {}),
        **extra,
    }


def write_manifest(root: str | Path, entries: list[dict]) -> Path:
    """Write :data:`MANIFEST_NAME` under ``root``."""
    path = Path(root) / MANIFEST_NAME
    doc = {
        "generator": "ai.synthetic",
        "note": "synthetic phantom studies, not patient data",
        "studies": entries,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _rsna_header(study: SyntheticStudy, number: str) -> Dataset:
    ds = Dataset()
    ds.ContentDate = study.study_date
    ds.ContentTime = f"{8 + study.seed % 10:02d}3430.{study.seed % 1000000:06d}"
    ds.PatientName = number
    ds.PatientID = number
    ds.SliceThickness = _ds(study.slice_thickness)
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = f"{study.study_uid}.1"
    row_dir, col_dir, dy, dx = orientation_of(study.volume.affine)
    ds.ImageOrientationPatient = [f"{v:.5f}" for v in (*row_dir, *col_dir)]
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.WindowCenter, ds.WindowWidth = "500", "2500"
    return ds


def write_rsna_study(
    root: str | Path, study: SyntheticStudy, transfer_syntax: str = "explicit"
) -> list[Path]:
    """Write one study's images as ``train_images/<StudyUID>/<InstanceNumber>.dcm``."""
    folder = Path(root) / "train_images" / study.study_uid
    number = study.study_uid.rsplit(".", 1)[-1]
    base = _rsna_header(study, number)

    return write_slices(
        base,
        study.volume.hu,
        study.volume.affine,
        [int(i) for i in study.instance_numbers],
        lambda inst: f"{study.study_uid}.1.{inst}",
        lambda inst: folder / f"{inst}.dcm",
        transfer_syntax,
        signed=True,
        slice_location=False,
        implementation=RSNA_IMPLEMENTATION,
        group_length=False,
    )


def write_rsna_dataset(
    root: str | Path,
    studies: Iterable[SyntheticStudy],
    *,
    transfer_syntax: str = "mixed",
    segmentation_fraction: float = 1.0,
) -> list[str]:
    """Write studies in the RSNA 2022 layout (see the module docstring).

    Parameters
    ----------
    root
        Dataset root (created). Existing CSVs are replaced.
    studies
        Generated studies (an iterable, so they can be generated one at a time).
    transfer_syntax
        A writer name (``explicit``, ``jpeg-lossless``, ``j2k-lossless``, ``rle``) for every
        study, or ``"mixed"``: one of :data:`MIXED_SYNTAXES` per study from its seed.
    segmentation_fraction
        Fraction of studies that get ``segmentations/<StudyUID>.nii`` (RSNA: 87 of
        2019); chosen from each study's seed, so a study's choice never depends on the
        others.

    Returns
    -------
    list[str]
        StudyInstanceUIDs in ``train.csv`` order.
    """
    if transfer_syntax != "mixed" and transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax must be 'mixed' or one of {sorted(TRANSFER_SYNTAXES)}, "
            f"got {transfer_syntax!r}"
        )
    if not 0.0 <= segmentation_fraction <= 1.0:
        raise ValueError("segmentation_fraction must be within 0..1")
    out = Path(root)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    (out / "segmentations").mkdir(exist_ok=True)
    uids: list[str] = []
    entries: list[dict] = []
    with (
        open(out / "train.csv", "w", newline="") as f_train,
        open(out / "train_bounding_boxes.csv", "w", newline="") as f_boxes,
    ):
        train = csv.writer(f_train, lineterminator="\n")
        boxes = csv.writer(f_boxes, lineterminator="\n")
        train.writerow(["StudyInstanceUID", "patient_overall", *VERTEBRAE])
        boxes.writerow(["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
        for study in studies:
            rng = np.random.default_rng([study.seed, 2022])
            ts = transfer_syntax
            if ts == "mixed":
                ts = MIXED_SYNTAXES[study.seed % len(MIXED_SYNTAXES)]
            with_seg = rng.uniform() < segmentation_fraction
            write_rsna_study(out, study, ts)
            if with_seg:
                img = segmentation_nifti(
                    study.labels, study.volume.affine, getattr(study, "rsna_max_code", 19)
                )
                nib.save(img, out / "segmentations" / f"{study.study_uid}.nii")
            train.writerow(
                [study.study_uid, study.patient_overall]
                + [study.vertebra_fractured[v] for v in VERTEBRAE]
            )
            for fr in study.fractures:
                for x, y, w, h, n in fr.boxes:
                    boxes.writerow(
                        [study.study_uid, f"{x:.5f}", f"{y:.5f}", f"{w:.5f}", f"{h:.5f}", n]
                    )
            uids.append(study.study_uid)
            entries.append(manifest_entry(study, transfer_syntax=ts, segmentation=bool(with_seg)))
            logger.debug("rsna study written transfer_syntax=%s segmentation=%s", ts, with_seg)
    write_manifest(out, entries)
    return uids
