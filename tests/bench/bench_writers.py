"""Time the writers on a 300-slice 512x512 series (plain script, not collected by pytest).

Run: ``.venv/bin/python tests/bench/bench_writers.py [out_dir]``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
from dicom_node.writers import write_seg, write_sr, write_summary

N, ROWS, COLS = 300, 512, 512


def headers() -> list[Dataset]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(N):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "B^M", "B1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Modality = "", "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-128.0, -128.0, -150.0 + k]
        ds.PixelSpacing, ds.Rows, ds.Columns = [0.5, 0.5], ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        out.append(ds)
    return out


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    sources = headers()
    label_map = np.zeros((N, ROWS, COLS), np.uint8)
    for v in range(1, 8):
        top = N - 20 - 25 * (v - 1)
        label_map[top - 22 : top, 200:300, 220:300] = v
    hu = np.where(label_map > 0, 700, -1000).astype(np.int16)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = [0, 0, 1.0], [0, 0.5, 0], [0.5, 0, 0]
    models = [ModelIdentity("seg-demo", "0.1.0", "0" * 64, "", True)]
    verdicts = [VertebraResult(n, True, True, 0.1 * i) for i, n in enumerate(VERTEBRAE)]
    result = PipelineResult(label_map, verdicts, 0.6, models)
    ident = {"software_version": "bench", "series_number": 900}
    for omit in (False, True):
        t0 = time.perf_counter()
        seg = write_seg(
            sources,
            result,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            omit_empty_frames=omit,
            **ident,
        )
        t1 = time.perf_counter()
        path = out_dir / f"seg_omit_{omit}.dcm"
        seg.save_as(path, enforce_file_format=True)
        t2 = time.perf_counter()
        print(
            f"SEG omit_empty_frames={omit}: build {t1 - t0:.2f} s, save {t2 - t1:.2f} s, "
            f"{int(seg.NumberOfFrames)} frames, {path.stat().st_size / 1e6:.1f} MB"
        )
    t0 = time.perf_counter()
    write_sr(
        sources,
        seg,
        result,
        threshold=0.5,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        **ident,
    )
    t1 = time.perf_counter()
    write_summary(
        sources,
        hu,
        affine,
        result,
        threshold=0.5,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        **ident,
    )
    t2 = time.perf_counter()
    print(f"SR build {t1 - t0:.2f} s; summary build {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
