"""Write a real NIfTI CT as an axial DICOM CT series with its patient-space geometry.

The NIfTI is brought to its closest canonical (RAS+) orientation by nibabel, which only
permutes and flips axes, then mapped to DICOM LPS: slice ``k`` runs inferior to superior,
rows run anterior to posterior and columns patient right to left, as scanners write
axial CT. Image Position (Patient) of each slice and Image Orientation (Patient) come
from the NIfTI affine, so the series occupies the same patient space as the NIfTI.
HU are stored as signed 16-bit values (slope 1, intercept 0). The header names nothing
of the upstream subject: the patient is "REAL^CT^TEST" with an ID made from the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ai.real_anatomy import lps_grid


def write_nifti_series(
    path: Path, out: Path, *, description: str, max_slices: int | None = None
) -> list[Path]:
    """Write ``path`` as one axial CT series of single-frame files under ``out``.

    Parameters
    ----------
    path
        NIfTI CT in HU.
    out
        Folder for the ``.dcm`` files (created).
    description
        Series Description.
    max_slices
        Keep only the top ``max_slices`` slices (``None``: all).

    Returns
    -------
    list of Path
        The files written, slice order inferior to superior.
    """
    hu, affine = lps_grid(path)
    hu = np.clip(np.rint(hu), -2048, 3071).astype(np.int16)
    if max_slices is not None:
        hu = hu[:, :, -max_slices:]
        affine = affine @ _shift(hu, max_slices, path)
    out.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(path.name.encode()).hexdigest()[:12]
    study_uid = generate_uid(entropy_srcs=["real-ct", key, "study"])
    series_uid = generate_uid(entropy_srcs=["real-ct", key, "series"])
    frame_uid = generate_uid(entropy_srcs=["real-ct", key, "frame"])
    col_dir = affine[:3, 0] / np.linalg.norm(affine[:3, 0])  # along a row (x index)
    row_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])  # down a column (y index)
    spacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))]
    dz = float(np.linalg.norm(affine[:3, 2]))
    files = []
    for k in range(hu.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        uid = generate_uid(entropy_srcs=["real-ct", key, "sop", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName, ds.PatientID = "REAL^CT^TEST", f"REAL{key[:8].upper()}"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", ""
        ds.ReferringPhysicianName, ds.StudyID = "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer = ""
        position = affine @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [round(float(v), 4) for v in position[:3]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*col_dir, *row_dir)]
        ds.PixelSpacing = [round(v, 5) for v in spacing]
        ds.SliceThickness = round(dz, 4)
        ds.PositionReferenceIndicator = ""
        ds.KVP = "120"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.PixelData = np.ascontiguousarray(hu[:, :, k].T).tobytes()  # [row=y, col=x]
        target = out / f"{k + 1:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        files.append(target)
    return files


def _shift(hu: np.ndarray, kept: int, path: Path) -> np.ndarray:
    """Translation that moves slice 0 to the first kept slice."""
    total = nib.as_closest_canonical(nib.load(str(path))).shape[2]
    shift = np.eye(4)
    shift[2, 3] = total - kept
    return shift


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.real.nifti_series NIFTI OUT_FOLDER``: write the series, print its UIDs."""
    import argparse

    import pydicom

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("nifti", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    files = write_nifti_series(args.nifti, args.out, description=f"real {args.nifti.name}")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    print(f"{len(files)} slices written to {args.out}; study {ds.StudyInstanceUID}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
