"""Peak RSS that ``write_seg`` adds for an N-slice 512x512 series (plain script, not a test).

Run: ``.venv/bin/python tests/bench/bench_seg_memory.py [slices]`` (default 600). It writes a
synthetic study as DICOM, reads the headers back, builds the SEG from the truth label map
and prints the process's peak RSS before and after ``write_seg``.
"""

from __future__ import annotations

import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from ai.synthetic import StudySpec, generate_study, write_series
from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
from dicom_node.writers import write_seg


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(slices: int) -> None:
    study = generate_study(9, StudySpec(n_slices=slices, fracture_rate=0.0, field_of_view="full"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_series(study, Path(tmp), "explicit")
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    by_uid = {ds.SOPInstanceUID: ds for ds in headers}
    sources = [by_uid[uid] for uid in study.volume.source_sop_instance_uids]
    label_map = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
    del study, headers
    result = PipelineResult(
        label_map,
        [VertebraResult(v, True, True, 0.1, None) for v in VERTEBRAE],
        0.1,
        [ModelIdentity("seg-demo", "bench", "0" * 64, "bench", True)],
    )
    gc.collect()
    before = _peak_mb()
    t0 = time.perf_counter()
    seg = write_seg(
        sources,
        result,
        series_instance_uid="1.2.826.0.1.3680043.8.498.1",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
        series_number=9001,
        software_version="bench",
    )
    seconds = time.perf_counter() - t0
    print(
        f"slices {slices}: peak RSS before write_seg {before:.0f} MB, after {_peak_mb():.0f} MB, "
        f"{int(seg.NumberOfFrames)} frames, {seconds:.1f} s"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 600)
