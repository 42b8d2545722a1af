"""Crop geometry of stage 2 on hand-made volumes and label maps."""

from __future__ import annotations

import numpy as np
import pytest

from ai.cls import CropConfig, extract_crops
from ai.types import CTVolume


def _volume(shape: tuple[int, int, int] = (60, 64, 64)) -> CTVolume:
    affine = np.array(
        [[0, 0, 0.8, 0], [0, 0.8, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
    )
    hu = np.full(shape, -1000, dtype=np.int16)
    return CTVolume(hu=hu, affine=affine)


def test_crop_box_contains_vertebra_and_mask_channel_marks_only_it() -> None:
    vol = _volume()
    lm = np.zeros(vol.hu.shape, np.uint8)
    lm[10:20, 20:40, 22:42] = 3  # C3
    lm[20:30, 22:42, 22:42] = 4  # C4, touching C3 on the next slice
    vol.hu[lm == 3] = 700
    cfg = CropConfig(size=32, n_slices=5, context=2, min_volume_mm3=10)
    batch = extract_crops(vol, lm, cfg)
    assert batch.crops.shape == (2, 5, 6, 32, 32)
    c3 = batch.vertebrae[2]
    assert c3.assessed and c3.index == 0 and c3.reason is None
    z0, z1, y0, y1, x0, x1 = c3.box
    assert (z0, z1) == (10, 20)
    assert y0 < 20 and y1 > 40 and x0 < 22 and x1 > 42  # margin on all sides
    assert c3.slices[0] == 10 and c3.slices[-1] == 19
    mask = batch.crops[c3.index, :, 5].numpy()
    assert mask.max() == pytest.approx(1.0)
    # C4 shares C3's last slice neighbourhood; on C3's crop slices the mask is C3 only
    assert mask.sum() > 0 and batch.crops[1, :, 5].sum() > 0
    # the centre slice image channel is bright where C3 is (HU 700 inside the bone window)
    centre = batch.crops[c3.index, 2, 2].numpy()
    assert centre[16, 16] == pytest.approx((700 + 500) / 1800, abs=0.02)
    for name in ("C1", "C2", "C5", "C6", "C7"):
        info = next(v for v in batch.vertebrae if v.label == name)
        assert not info.assessed and info.reason == "not in the field of view"
        assert info.index is None and not info.visible


def test_mask_channel_is_zero_for_other_vertebra_only_pixels() -> None:
    vol = _volume()
    lm = np.zeros(vol.hu.shape, np.uint8)
    lm[10:20, 20:30, 20:44] = 2
    lm[10:20, 30:40, 20:44] = 3  # same slices, adjacent rows
    batch = extract_crops(vol, lm, CropConfig(size=40, n_slices=3, min_volume_mm3=10))
    c2 = batch.vertebrae[1]
    m2 = batch.crops[c2.index, 1, 5].numpy()
    _, _, y0, y1, _, _ = c2.box
    scale = 40 / (y1 - y0)
    row_c3 = int((35 - y0) * scale)  # a row fully inside C3
    row_c2 = int((25 - y0) * scale)
    assert m2[row_c3].max() == 0.0
    assert m2[row_c2].max() == pytest.approx(1.0)


def test_small_or_missing_mask_is_not_assessed_and_never_a_tensor() -> None:
    vol = _volume()
    lm = np.zeros(vol.hu.shape, np.uint8)
    lm[30, 30, 30] = 5  # a speck: 0.64 mm3
    batch = extract_crops(vol, lm, CropConfig(size=16))
    assert batch.crops.shape[0] == 0
    c5 = batch.vertebrae[4]
    assert not c5.assessed and c5.visible and c5.reason.startswith("mask too small")
    assert all(not v.assessed for v in batch.vertebrae)


def test_slice_threshold_drops_stray_voxels_with_fallback() -> None:
    vol = _volume()
    lm = np.zeros(vol.hu.shape, np.uint8)
    lm[20:30, 20:40, 20:40] = 1
    lm[45, 30, 30] = 1  # stray voxel far away on another slice
    batch = extract_crops(vol, lm, CropConfig(size=16, min_volume_mm3=10))
    assert batch.vertebrae[0].box[:2] == (20, 30)
    # a 2-slice vertebra fails the ">= 3 slices" test and falls back to the full extent
    lm2 = np.zeros(vol.hu.shape, np.uint8)
    lm2[20:22, 20:40, 20:40] = 1
    lm2[25, 30, 30] = 1
    batch2 = extract_crops(vol, lm2, CropConfig(size=16, min_volume_mm3=10))
    assert batch2.vertebrae[0].box[:2] == (20, 26)


def test_context_channels_clamp_at_volume_edges_and_shape_mismatch() -> None:
    vol = _volume()
    vol.hu[0] = 1300
    lm = np.zeros(vol.hu.shape, np.uint8)
    lm[0:6, 20:40, 20:40] = 6
    batch = extract_crops(vol, lm, CropConfig(size=16, n_slices=3, min_volume_mm3=10))
    first = batch.crops[0, 0, :5, 8, 8].numpy()
    # slice 0 with context -2,-1 clamped to slice 0 (HU 1300 -> 1.0); +1,+2 are air (0.0)
    assert np.allclose(first, [1, 1, 1, 0, 0], atol=1e-5)
    with pytest.raises(ValueError, match="label map shape"):
        extract_crops(vol, lm[:-1], CropConfig(size=16))
