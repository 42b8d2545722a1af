"""Measure stage 2 (crops + classifier) on a 300-slice 512x512 study.

Not a test. Run::

    .venv/bin/python tests/bench/bench_cls.py [--model cls-demo] [--device cpu] [--threads 2]

The volume is synthetic noise with seven 24 mm vertebra-like label regions stacked along
the slices (0.5 x 0.5 x 1.0 mm voxels), so every vertebra is assessed (7 x 15 slices).
Stage 2 time = crop extraction + one batched forward, as in ``ClsModel.predict``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cls-demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ai.cls import ClsModel
    from ai.types import CTVolume

    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(300, 512, 512), dtype=np.int16)
    lm = np.zeros(hu.shape, np.uint8)
    for v in range(7):
        z = 20 + 38 * v
        lm[z : z + 34, 200:300, 210:310] = v + 1
    affine = np.array([[0, 0, 0.5, 0], [0, 0.5, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    vol = CTVolume(hu=hu, affine=affine)
    model = ClsModel.load(args.model, device=args.device)
    model.predict(vol, lm)  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        verdicts, patient = model.predict(vol, lm)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    from ai.cls.crops import extract_crops

    t0 = time.perf_counter()
    extract_crops(vol, lm, model.crop_config)
    crop_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "model": model.identity.name,
                "device": str(model.device),
                "threads": args.threads,
                "crop_size": model.crop_config.size,
                "assessed": sum(v.assessed for v in verdicts),
                "stage2_seconds_median": float(np.median(times)),
                "stage2_seconds_all": [round(t, 3) for t in times],
                "crop_extraction_seconds": round(crop_s, 3),
                "patient_probability": patient,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
