"""Small DICOM builders for tests (the synthetic phantom lives in ai.synthetic)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SECRET_NAME = "SECRETNAME^TESTPATIENT"
SECRET_ID = "PIDSECRET12345"
SECRET_BIRTH = "19010203"
SECRET_ACCESSION = "ACCSECRET987"


@contextlib.contextmanager
def lenient_writing() -> Iterator[None]:
    """Allow writing deliberately invalid values (hostile-input fixtures)."""
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.WARN
    try:
        yield
    finally:
        pydicom_config.settings.writing_validation_mode = old


def ct_slice(
    study_uid: str,
    series_uid: str,
    index: int,
    *,
    rows: int = 32,
    cols: int = 32,
    spacing: float = 1.0,
    sop_class: str = CT,
    seed: int = 0,
) -> Dataset:
    """One valid CT slice (int16 pixels, rescale -1024) at z = index * spacing."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.PatientBirthDate = SECRET_BIRTH
    ds.PatientSex = "O"
    ds.AccessionNumber = SECRET_ACCESSION
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT" if sop_class == CT else "MR"
    ds.SeriesNumber = 2
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * spacing]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.KVP = 120
    rng = np.random.default_rng(seed * 10007 + index)
    pixels = rng.integers(0, 2000, size=(rows, cols), dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_series(
    folder: Path, n: int = 5, *, rows: int = 32, cols: int = 32, study_uid: str | None = None
) -> list[Path]:
    """Write an n-slice CT series into ``folder``; return the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(n):
        ds = ct_slice(study_uid, series_uid, i, rows=rows, cols=cols)
        path = folder / f"slice{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part-10 file after its file meta group."""
    from pydicom.filereader import (
        _read_file_meta_info,  # type: ignore[attr-defined]
        read_preamble,
    )

    with path.open("rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()


STAGE2_READY = {"rows": 176, "cols": 176}
"""``StudySpec.small`` overrides for pixels within stage 2's intended use (<= 1.0 mm).

The small preset's 96 columns over 120-170 mm give 1.25-1.77 mm pixels, outside it: the
node then delivers the SEG and says "not assessed: input outside intended use" for every
vertebra."""
