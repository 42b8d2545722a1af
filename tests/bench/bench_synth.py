"""Measure: one 300-slice 512x512 synthetic study generated and written (not a pytest test).

Usage: ``.venv/bin/python tests/bench/bench_synth.py [--repeat N] [--seed S] [--fov MM]
[--transfer-syntax NAME]``. Prints generation and writing seconds per run and the best
total. Target (issue 3): under 5 s on 2 CPU cores for explicit VR little endian.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from ai.synthetic import StudySpec, generate_study, write_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fov",
        type=float,
        default=None,
        help="fixed in-plane FOV in mm (128 = 0.25 mm pixels, the slowest)",
    )
    parser.add_argument("--transfer-syntax", default="explicit")
    args = parser.parse_args()
    fov = (args.fov, args.fov) if args.fov else (128.0, 358.0)
    spec = StudySpec(n_slices=300, rows=512, cols=512, fov_mm=fov, fracture_rate=1.0)
    print(f"cpus={os.cpu_count()} affinity={len(os.sched_getaffinity(0))}")
    totals = []
    for i in range(args.repeat):
        out = Path(tempfile.mkdtemp(prefix="bench_synth_"))
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            study = generate_study(args.seed + i, spec)
            t1 = time.perf_counter()
            paths = write_series(study, out, args.transfer_syntax)
            t2, c2 = time.perf_counter(), time.process_time()
        finally:
            shutil.rmtree(out, ignore_errors=True)
        totals.append(t2 - t0)
        print(
            f"seed={args.seed + i} shape={study.shape} spacing="
            f"{tuple(round(s, 3) for s in study.volume.spacing)} generate={t1 - t0:.2f}s "
            f"write={t2 - t1:.2f}s ({len(paths)} files, {args.transfer_syntax}) "
            f"total={t2 - t0:.2f}s (cpu {c2 - c0:.2f}s, load {os.getloadavg()[0]:.1f})"
        )
    print(f"best total {min(totals):.2f}s, worst {max(totals):.2f}s over {len(totals)} runs")


if __name__ == "__main__":
    main()
