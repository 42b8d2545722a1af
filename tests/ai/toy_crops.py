"""Tiny stage-2 inputs: 7 boxes of 'bone' stacked along z, and their cached crops."""

from __future__ import annotations

import numpy as np
import torch

from ai.cls import CropConfig, extract_crops
from ai.cls.data import StudyCrops
from ai.types import CTVolume


def toy_study(
    seed: int, fractured: int | None = None, *, bone_jitter: bool = False
) -> tuple[CTVolume, np.ndarray, np.ndarray]:
    """A 70x40x40 volume, its label map and its 8 labels (C1..C7, patient).

    A fracture is a dark gap through one box. With ``bone_jitter`` each box's HU varies
    with the seed (700..899) instead of being 800, so that features have a spread.
    """
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 20, size=(70, 40, 40)).astype(np.int16)
    lm = np.zeros(hu.shape, np.uint8)
    for v in range(7):
        z = 2 + 9 * v
        lm[z : z + 8, 12:28, 12:28] = v + 1
        hu[z : z + 8, 12:28, 12:28] = 700 + rng.integers(0, 200) if bone_jitter else 800
    labels = np.zeros(8, np.float32)
    if fractured is not None:
        z = 2 + 9 * fractured
        hu[z + 3 : z + 5, 12:28, 18:21] = -200
        labels[fractured] = labels[7] = 1
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    return CTVolume(hu=hu, affine=affine), lm, labels


def cached_crops(
    i: int,
    vol: CTVolume,
    lm: np.ndarray,
    labels: np.ndarray,
    crop: CropConfig,
    slice_labels: np.ndarray | None = None,
) -> StudyCrops:
    """Crops of one toy study as the crop cache stores them."""
    batch = extract_crops(vol, lm, crop)
    return StudyCrops(
        str(i),
        (batch.crops * 255).round().to(torch.uint8),
        batch.present,
        labels,
        [v.reason for v in batch.vertebrae],
        slice_labels,
    )
