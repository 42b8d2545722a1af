"""The Dice ceiling of a stage-1 working size: the truth itself through the working grid.

Usage::

    .venv/bin/python -m tests.bench.seg_ceiling RSNA_ROOT [DxHxW] [N] [--bone-hu HU]

For the first N studies (default 20) of an RSNA-layout root with segmentations, the truth
label map is resampled onto the working grid exactly as the stage-1 model sees its
second-pass region (the truth's bounding box plus the model's margin, area-averaged
soft labels, the same code as training), turned into logits and mapped back onto the
source grid by the inference code (``labels_from_logits``: linear upsampling, threshold,
arg-max, then the post-processing). The mean
Dice of that round trip is what a perfect network could score at this working size
(default: the shipped ``seg-demo`` size). ``--bone-hu`` maps back with the bone
refinement of :class:`ai.seg.model.PostSpec` (labels from the grid, boundary from the
image) instead of plain thresholding. A plain script, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def ceiling_dice(truth: np.ndarray, hu: np.ndarray, affine: np.ndarray, spec, post) -> dict:
    """Per-vertebra Dice of ``truth`` after the round trip through ``spec``'s grid."""
    from ai.seg.model import labels_from_logits
    from ai.seg.preprocess import canonical_transform, canonical_view, prepare_labels, roi_from_mask
    from ai.seg.train import dice_per_label
    from ai.types import CTVolume

    canon = canonical_transform(affine)
    view_t = canonical_view(truth, canon)
    whole = (0, view_t.shape[0], 0, view_t.shape[1], 0, view_t.shape[2])
    roi = roi_from_mask(view_t > 0, whole, view_t.shape, canon.spacing, spec.roi_margin_mm)
    soft = prepare_labels(truth, affine, spec, roi).clamp(1e-4, 1 - 1e-4)
    logits = torch.log(soft / (1 - soft))
    out = labels_from_logits(CTVolume(hu=hu, affine=affine), logits, canon, roi, post)
    return dice_per_label(out.label_map, truth)


def main() -> None:
    from ai.rsna import RSNADataset
    from ai.seg import SegModel
    from ai.seg.model import PostSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("size", nargs="?", default=None, help="DxHxW")
    parser.add_argument("n", nargs="?", type=int, default=20)
    parser.add_argument("--bone-hu", type=float, default=None)
    parser.add_argument("--region-threshold", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = args.root
    spec = SegModel.load("seg-demo", device="cpu").input_spec
    if args.size:
        spec = dataclasses.replace(spec, size=tuple(int(x) for x in args.size.split("x")))
    n = args.n
    post = PostSpec(
        min_visible_mm3=0.0, bone_hu=args.bone_hu, region_threshold=args.region_threshold
    )
    ds = RSNADataset(root)
    means = []
    for uid in [u for u in ds.study_uids if ds.has_segmentation(u)][:n]:
        study = ds.load(uid)
        truth = np.asarray(study.segmentation).astype(np.uint8)
        truth = np.where(truth <= 7, truth, 0).astype(np.uint8)
        dice = ceiling_dice(truth, study.volume.hu, study.volume.affine, spec, post)
        means.append(float(np.nanmean(list(dice.values()))))
    size = "x".join(str(s) for s in spec.size)
    how = "plain threshold" if args.bone_hu is None else f"bone refinement at {args.bone_hu:g} HU"
    print(
        f"working size {size}, {how}: ceiling mean Dice {np.mean(means):.4f} "
        f"over {len(means)} studies"
    )


if __name__ == "__main__":
    main()
