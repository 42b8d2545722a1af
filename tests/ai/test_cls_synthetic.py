"""Stage-2 crops on synthetic studies: fracture boxes from the truth lie inside their crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional

from ai.cls import CropConfig, extract_crops
from ai.synthetic import StudySpec, generate_study
from ai.types import VERTEBRAE


def _fractured_study():
    for seed in range(40):
        study = generate_study(seed, StudySpec.small(fracture_rate=1.0, field_of_view="full"))
        if study.fractures and any(f.boxes for f in study.fractures):
            return study
    raise AssertionError("no fractured synthetic study in 40 seeds")


def test_fracture_boxes_lie_inside_their_vertebra_crop_and_mask_is_that_vertebra() -> None:
    study = _fractured_study()
    lm = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
    cfg = CropConfig(size=48, n_slices=15)
    batch = extract_crops(study.volume, lm, cfg)
    instance = [int(n) for n in study.instance_numbers]
    checked = other_seen = 0
    for fr in study.fractures:
        v = VERTEBRAE.index(fr.vertebra) + 1
        info = batch.vertebrae[v - 1]
        assert info.assessed, info.reason
        z0, z1, y0, y1, x0, x1 = info.box
        zs = []
        for x, y, w, h, number in fr.boxes:
            assert y0 <= y and y + h <= y1, (fr, info.box)
            assert x0 <= x and x + w <= x1, (fr, info.box)
            zs.append(instance.index(number))
            checked += 1
        # the fracture's slices overlap the slices the crop samples
        assert min(zs) <= z1 - 1 and max(zs) >= z0
    for info in batch.vertebrae:
        if not info.assessed:
            continue
        v = VERTEBRAE.index(info.label) + 1
        z0, z1, y0, y1, x0, x1 = info.box
        # mask channel: only this vertebra. Resample each other vertebra's mask with the
        # same box; where another vertebra is and this one is not, the channel is 0.
        mask = batch.crops[info.index, :, -1]
        idx = info.slices
        own = torch.from_numpy((lm[idx, y0:y1, x0:x1] == v).astype(np.float32))[:, None]
        others = torch.from_numpy(
            ((lm[idx, y0:y1, x0:x1] > 0) & (lm[idx, y0:y1, x0:x1] != v)).astype(np.float32)
        )[:, None]
        size = (cfg.size, cfg.size)
        own_r = functional.interpolate(own, size=size, mode="nearest")[:, 0]
        oth_r = functional.interpolate(others, size=size, mode="nearest")[:, 0]
        only_other = (oth_r > 0) & (own_r == 0)
        assert mask.max() == pytest.approx(1.0, abs=1e-3)
        # bilinear resize blurs edges by up to a pixel; far from own voxels it must be 0
        far = only_other & (functional.max_pool2d(own_r[:, None], 5, 1, 2)[:, 0] == 0)
        if far.any():
            assert float(mask[far].abs().max()) == 0.0
            other_seen += 1
    assert checked > 0
    assert other_seen > 0  # some crop did contain a neighbouring vertebra
