"""Stage-1 measurements (a plain script, not a test).

Usage::

    .venv/bin/python tests/bench/bench_seg.py time   [--slices 300] [--threads 2] [--device cpu]
    .venv/bin/python tests/bench/bench_seg.py memory [--slices 1000]

``time``: writes a 512x512 synthetic study (``ai.synthetic``) as DICOM, then times
decode (``ai.volume.load_series``) and ``SegModel.predict`` (preprocess, network,
resampling back to the source grid, post-processing), and reports the Dice against
the generator's truth.

``norm``: compares the fixed bone window with the per-volume min-max of the reference
code on held-out synthetic studies: how much the network input moves when a scanner
pads outside its reconstruction circle with -3024 HU or a small metal object (3071 HU)
appears, the bone/soft-tissue contrast each gives, and the model's Dice on the
perturbed studies (``--model`` is a bone-window model).

``memory``: writes an N-slice 512x512 series (the synthetic study's slices repeated
along z with fresh positions), then in a fresh process loads it and runs stage 1,
reporting the peak resident set size (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _write_study(out: Path, slices: int, seed: int = 1234) -> tuple[list[Path], object]:
    from ai.synthetic import StudySpec, generate_study, write_series

    study = generate_study(seed, StudySpec(rows=512, cols=512, n_slices=slices))
    paths = write_series(study, out)
    return paths, study


def cmd_time(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from ai.seg import SegModel
    from ai.seg.train import dice_per_label
    from ai.volume import load_series

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        paths, study = _write_study(Path(tmp), args.slices)
        model = SegModel.load(args.model, device=args.device)
        model.predict(load_series(paths[: min(len(paths), 40)]))  # warm-up (allocator, threads)
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            vol = load_series(paths)
            t1 = time.perf_counter()
            out = model.predict(vol)
            if args.device != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            runs.append({"decode_s": t1 - t0, "stage1_s": t2 - t1, "total_s": t2 - t0})
        truth = np.where(study.labels <= 7, study.labels, 0)
        dice = dice_per_label(out.label_map, truth)
    best = min(runs, key=lambda r: r["total_s"])
    return {
        "what": "decode + preprocess + predict + resample + post-process",
        "shape": list(vol.hu.shape),
        "threads": args.threads,
        "device": str(model.device),
        "runs": runs,
        "best": best,
        "dice": dice,
    }


def cmd_memory(args: argparse.Namespace) -> dict:
    import numpy as np
    import pydicom

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        base, _ = _write_study(Path(tmp) / "base", 100)
        out = Path(tmp) / "big"
        out.mkdir()
        headers = [pydicom.dcmread(p) for p in base]
        headers.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        z0 = float(headers[0].ImagePositionPatient[2])
        step = float(headers[1].ImagePositionPatient[2]) - z0
        for k in range(args.slices):
            ds = headers[k % len(headers)]
            ds.ImagePositionPatient[2] = z0 + k * step
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.save_as(out / f"{k:05d}.dcm")
        del headers
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "_child",
                "--dir",
                str(out),
                "--model",
                args.model,
                "--threads",
                str(args.threads),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["slices"] = args.slices
    _ = np
    return result


def _perturb(hu, kind: str, labels):
    import numpy as np

    out = hu.copy()
    if kind == "padding":
        yy, xx = np.mgrid[: hu.shape[1], : hu.shape[2]]
        r = 0.47 * min(hu.shape[1:])
        outside = (yy - hu.shape[1] / 2) ** 2 + (xx - hu.shape[2] / 2) ** 2 > r * r
        out[:, outside] = -3024
    elif kind == "metal":
        k, j, i = np.argwhere(labels == 5).mean(axis=0).astype(int)
        out[k - 2 : k + 3, j - 12 : j - 6, i - 3 : i + 3] = 3071
    return out


def cmd_norm(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from ai.seg import InputSpec, SegModel
    from ai.seg.preprocess import canonical_transform, canonical_view, prepare_input, roi_from_mask
    from ai.seg.train import dice_per_label
    from ai.synthetic import StudySpec, generate_study
    from ai.types import CTVolume

    model = SegModel.load(args.model, device=args.device)
    rows = []
    for seed in range(50001, 50001 + args.studies):
        study = generate_study(seed, StudySpec())
        hu, aff = study.volume.hu, study.volume.affine
        truth = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
        canon = canonical_transform(aff)
        view = canonical_view(truth, canon)
        full = (0, view.shape[0], 0, view.shape[1], 0, view.shape[2])
        roi = roi_from_mask(view > 0, full, view.shape, canon.spacing, 10.0)
        row = {"seed": seed}
        for norm in ("bone_window", "minmax"):
            spec = InputSpec(size=(96, 64, 64), normalization=norm)
            base = prepare_input(hu, aff, spec, roi=roi)[0]
            for kind in ("padding", "metal"):
                moved = prepare_input(_perturb(hu, kind, truth), aff, spec, roi=roi)[0]
                row[f"{norm}_{kind}_mean_abs_change"] = float((moved - base).abs().mean())
            bone = hu[truth > 0].astype(float).mean()
            soft = 50.0
            if norm == "bone_window":
                lo, hi = spec.window
            else:
                lo, hi = float(hu.min()), float(hu.max())
            row[f"{norm}_bone_soft_contrast"] = (min(bone, hi) - max(soft, lo)) / (hi - lo)
        for kind in ("none", "padding", "metal"):
            vol = CTVolume(hu=_perturb(hu, kind, truth) if kind != "none" else hu, affine=aff)
            d = dice_per_label(model.predict(vol).label_map, truth)
            row[f"model_dice_{kind}"] = float(np.nanmean(list(d.values())))
        rows.append(row)
    keys = [k for k in rows[0] if k != "seed"]
    return {
        "studies": len(rows),
        "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
        "rows": rows,
    }


def cmd_child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from ai.seg import SegModel
    from ai.volume import load_series

    paths = sorted(Path(args.dir).glob("*.dcm"))
    model = SegModel.load(args.model, device="cpu")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    vol = load_series(paths)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = model.predict(vol)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "shape": list(vol.hu.shape),
        "volume_mb": vol.hu.nbytes / 2**20,
        "rss_after_model_load_mb": round(base_rss),
        "peak_rss_after_decode_mb": round(after_load),
        "peak_rss_mb": round(peak),
        "seconds": round(time.perf_counter() - t0, 2),
        "visible": [k for k, v in out.visible.items() if v],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["time", "memory", "norm", "_child"])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--slices", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="seg-demo")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--tmp", default=os.environ.get("TMPDIR", "/tmp"))
    args = parser.parse_args()
    if args.mode == "time":
        args.slices = args.slices or 300
        result = cmd_time(args)
    elif args.mode == "norm":
        result = cmd_norm(args)
    elif args.mode == "memory":
        args.slices = args.slices or 1000
        result = cmd_memory(args)
    else:
        result = cmd_child(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
