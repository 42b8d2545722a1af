"""Seconds the gate adds to a job: intended use of both stages and the plausibility checks.

``python -m tests.bench.bench_gate [SLICES]`` builds a synthetic 512x512 study of SLICES
slices (default 300), runs stage 1 once, then times each check on its label map (best of
three). ``make bench`` reports the same seconds per job (``gate``) from the turnaround run.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ai import plausibility
from ai.pipeline import Pipeline
from ai.synthetic import StudySpec, generate_study


def main(argv: list[str]) -> None:
    slices = int(argv[0]) if argv else 300
    pipe = Pipeline.load(device="cpu")
    vol = generate_study(300300, StudySpec(n_slices=slices, field_of_view="full")).volume
    label_map = np.asarray(pipe.seg.predict(vol).label_map)
    assert pipe.stage1_use is not None and pipe.stage2_use is not None
    best = {"stage1 intended use": 9e9, "plausibility": 9e9, "stage2 intended use": 9e9}
    for _ in range(3):
        t0 = time.perf_counter()
        pipe.stage1_use.check(vol)
        t1 = time.perf_counter()
        verdict = plausibility.check(vol, label_map)
        t2 = time.perf_counter()
        pipe.stage2_use.check(vol)
        t3 = time.perf_counter()
        for key, seconds in zip(best, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            best[key] = min(best[key], seconds)
    print(f"gate on {vol.hu.shape[0]}x{vol.hu.shape[1]}x{vol.hu.shape[2]} (best of 3):")
    for key, seconds in best.items():
        print(f"  {key:<20} {seconds:.3f} s")
    print(f"  {'total':<20} {sum(best.values()):.3f} s (target < 0.5 s)")
    print(f"  findings: {[f.message for f in verdict.findings] or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:])
