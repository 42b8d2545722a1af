"""Stage-2 crops on synthetic studies: fracture boxes from the truth lie inside their crop."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch.nn import functional

from ai.cls import CropConfig, extract_crops
from ai.cls.data import box_maps_from_boxes, slice_labels_from_boxes
from ai.synthetic import StudySpec, generate_study
from ai.types import VERTEBRAE


def _fractured_study():
    for seed in range(40):
        study = generate_study(seed, StudySpec.small(fracture_rate=1.0, field_of_view="full"))
        if study.fractures and any(f.boxes for f in study.fractures):
            return study
    raise AssertionError("no fractured synthetic study in 40 seeds")


@functools.cache
def _cropped():
    """The fractured study, its truth label map, the crop config, its crops, and the
    instance numbers in slice order."""
    study = _fractured_study()
    lm = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
    cfg = CropConfig(size=48, n_slices=15)
    batch = extract_crops(study.volume, lm, cfg)
    return study, lm, cfg, batch, [int(n) for n in study.instance_numbers]


def test_fracture_boxes_lie_inside_their_vertebra_crop_and_mask_is_that_vertebra() -> None:
    study, lm, cfg, batch, instance = _cropped()
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


def test_box_maps_mark_the_fracture_boxes_on_the_slices_labelled_fractured() -> None:
    study, lm, _cfg, batch, instance = _cropped()
    boxes = [
        (instance.index(number), float(x), float(y), float(w), float(h))
        for fr in study.fractures
        for x, y, w, h, number in fr.boxes
    ]
    labels = np.array([study.vertebra_fractured[v] for v in VERTEBRAE] + [1], dtype=np.float32)
    slice_labels = slice_labels_from_boxes(batch, lm, labels, boxes)
    maps = box_maps_from_boxes(batch, lm, labels, boxes)
    assert maps.dtype == torch.uint8
    assert maps.shape == (int(batch.present.sum()), 15, 48, 48)
    # a map is drawn exactly on the slices whose label says "fracture here"
    drawn = maps.flatten(2).amax(dim=2).numpy()
    assert (drawn == (slice_labels == 1)).all()
    assert drawn.sum() > 0
    for fr in study.fractures:
        info = batch.vertebrae[VERTEBRAE.index(fr.vertebra)]
        _z0, _z1, y0, y1, x0, x1 = info.box
        sy, sx = 48 / (y1 - y0), 48 / (x1 - x0)
        own = [(instance.index(n), x, y, w, h) for x, y, w, h, n in fr.boxes]
        for s, centre in enumerate(info.slices):
            near = [b for b in own if abs(b[0] - centre) <= 1]
            if not near:
                continue
            assert drawn[info.index, s]
            # every box of this fracture near the slice is filled, mapped into crop pixels
            for _k, x, y, w, h in near:
                r = int((y + h / 2 - y0) * sy)
                c = int((x + w / 2 - x0) * sx)
                assert maps[info.index, s, r, c] == 1
            # and nothing is drawn outside the union of the near boxes (one pixel of rounding)
            rows, cols = np.nonzero(maps[info.index, s].numpy())
            assert rows.min() >= min((b[2] - y0) * sy for b in near) - 1
            assert rows.max() <= max((b[2] + b[4] - y0) * sy for b in near) + 1
            assert cols.min() >= min((b[1] - x0) * sx for b in near) - 1
            assert cols.max() <= max((b[1] + b[3] - x0) * sx for b in near) + 1
    # vertebrae without a fracture get empty maps
    for info in batch.vertebrae:
        if info.assessed and not study.vertebra_fractured[info.label]:
            assert int(maps[info.index].sum()) == 0
