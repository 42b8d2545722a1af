"""The Dice ceiling of a stage-1 working size: the truth itself through the working grid.

Usage::

    .venv/bin/python -m tests.bench.seg_ceiling RSNA_ROOT [DxHxW] [N]

For the first N studies (default 20) of an RSNA-layout root with segmentations, the truth
label map is resampled onto the working grid exactly as the stage-1 model sees its
second-pass region (the truth's bounding box plus the model's margin, area-averaged
soft labels, the same code as training), turned into logits and mapped back onto the
source grid by the inference code (linear upsampling, threshold, arg-max). The mean
Dice of that round trip is what a perfect network could score at this working size
(default: the shipped ``seg-demo`` size). A plain script, not a test.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def ceiling_dice(truth: np.ndarray, affine: np.ndarray, spec) -> dict[str, float]:
    """Per-vertebra Dice of ``truth`` after the round trip through ``spec``'s grid."""
    from ai.seg.preprocess import (
        canonical_transform,
        canonical_view,
        iter_source_slabs,
        prepare_labels,
        roi_from_mask,
    )
    from ai.seg.train import dice_per_label

    canon = canonical_transform(affine)
    view_t = canonical_view(truth, canon)
    whole = (0, view_t.shape[0], 0, view_t.shape[1], 0, view_t.shape[2])
    roi = roi_from_mask(view_t > 0, whole, view_t.shape, canon.spacing, spec.roi_margin_mm)
    soft = prepare_labels(truth, affine, spec, roi).clamp(1e-4, 1 - 1e-4)
    logits = torch.log(soft / (1 - soft))
    out = np.zeros_like(truth)
    view = canonical_view(out, canon)
    _z0, _z1, y0, y1, x0, x1 = roi
    for start, probs in iter_source_slabs(logits, roi):
        best, arg = probs.max(dim=0)
        lab = torch.where(best > 0.5, arg + 1, 0).to(torch.uint8).numpy()
        view[start : start + lab.shape[0], y0:y1, x0:x1] = lab
    return dice_per_label(out, truth)


def main() -> None:
    from ai.rsna import RSNADataset
    from ai.seg import SegModel

    torch.set_num_threads(2)
    root = sys.argv[1]
    spec = SegModel.load("seg-demo", device="cpu").input_spec
    if len(sys.argv) > 2:
        spec = dataclasses.replace(spec, size=tuple(int(x) for x in sys.argv[2].split("x")))
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    ds = RSNADataset(root)
    means = []
    for uid in [u for u in ds.study_uids if ds.has_segmentation(u)][:n]:
        study = ds.load(uid)
        truth = np.asarray(study.segmentation).astype(np.uint8)
        truth = np.where(truth <= 7, truth, 0).astype(np.uint8)
        dice = ceiling_dice(truth, study.volume.affine, spec)
        means.append(float(np.nanmean(list(dice.values()))))
    size = "x".join(str(s) for s in spec.size)
    print(f"working size {size}: ceiling mean Dice {np.mean(means):.4f} over {len(means)} studies")


if __name__ == "__main__":
    main()
