"""Stage-1 post-processing keeps its results while working in slabs (issue #9, memory)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from scipy import ndimage

from ai.seg.model import keep_largest_components


def _reference(label_map: np.ndarray) -> None:
    """The whole-box implementation the slab version replaced."""
    structure = np.ones((3, 3, 3), dtype=bool)
    for value, box in enumerate(ndimage.find_objects(label_map, max_label=7), start=1):
        if box is None:
            continue
        sub = label_map[box]
        comps, n = ndimage.label(sub == value, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comps.ravel())
        sizes[0] = 0
        sub[(comps != 0) & (comps != int(np.argmax(sizes)))] = 0


def test_largest_components_equal_the_whole_box_computation() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        shape = (int(rng.integers(20, 60)), 24, 20)
        lab = (rng.random(shape) < 0.25).astype(np.uint8) * rng.integers(1, 8, shape, np.uint8)
        expected, got = lab.copy(), lab.copy()
        _reference(expected)
        keep_largest_components(got)
        np.testing.assert_array_equal(got, expected)
        assert (got != lab).any()  # specks were removed, so the comparison means something


def test_largest_components_need_no_int64_copy_of_the_box() -> None:
    lab = np.zeros((96, 128, 128), np.uint8)
    lab[4:90, 8:120, 8:120] = 3
    lab[50, 60:70, :] = 0  # still one component
    lab[92:95, 2:5, 2:5] = 3  # a speck: the box spans the whole volume, two components
    box_voxels = lab.size
    tracemalloc.start()
    try:
        keep_largest_components(lab)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (lab[92:95, 2:5, 2:5] == 0).all() and (lab == 3).sum() > 0
    # int32 components + bool mask (5 B/voxel) and slab temporaries; the whole-box
    # bincount and masks used 16 B/voxel
    assert peak < 6 * box_voxels, peak / box_voxels


def _reference_input(hu, affine, spec, roi=None):  # type: ignore[no-untyped-def]
    """The allocate-per-slab input preparation the reused-buffer version replaced."""
    from ai.seg import preprocess as pp

    canon = pp.canonical_transform(affine)
    view = pp.canonical_view(hu, canon)
    if roi is None:
        roi = (0, view.shape[0], *pp.body_box(view, spec, canon.spacing))
    z0, z1, y0, y1, x0, x1 = roi
    lo_hi = (float(hu.min()), float(hu.max())) if spec.normalization == "minmax" else spec.window
    d, h, w = spec.size
    planes = []
    for start in range(z0, z1, pp.SLAB):
        chunk = np.ascontiguousarray(view[start : min(start + pp.SLAB, z1), y0:y1, x0:x1])
        lo, hi = lo_hi
        t = torch.from_numpy(chunk).float()
        if spec.normalization == "bone_window":
            lo, hi = spec.window
            t = t.clamp_(lo, hi)
        t = ((t - lo) / max(hi - lo, 1e-6)).unsqueeze(1)
        planes.append(pp._resize_2d(t, h, w))
    low = pp._resize_1d_axis0(torch.cat(planes, dim=0)[:, 0], d)
    return low[None, None].contiguous(), canon, roi


@pytest.mark.parametrize("normalization", ["bone_window", "minmax"])
def test_network_input_is_bitwise_the_per_slab_computation(normalization: str) -> None:
    from ai.seg.preprocess import InputSpec, prepare_input

    rng = np.random.default_rng(11)
    hu = rng.integers(-1024, 2500, size=(75, 90, 80), dtype=np.int16)
    hu[:, :10] = -1000  # air around the body: the body box crops it
    affine = np.diag([-2.0, 0.7, -0.7, 1.0])  # flipped axes: negative-stride canonical view
    affine[:3, 3] = [10.0, -20.0, 30.0]
    spec = InputSpec(size=(32, 32, 32), normalization=normalization)
    for roi in (None, (3, 70, 12, 80, 5, 70)):
        got, canon, got_roi = prepare_input(hu, affine, spec, roi=roi)
        expected, canon2, roi2 = _reference_input(hu, affine, spec, roi=roi)
        assert canon == canon2 and got_roi == roi2
        assert torch.equal(got, expected)


def test_source_slabs_do_not_depend_on_the_slab_size(monkeypatch) -> None:
    """Each slice is interpolated on its own, so 2-slice slabs give the 8-slice values."""
    from ai.seg import preprocess as pp

    logits = torch.randn(7, 16, 12, 12, generator=torch.Generator().manual_seed(3)) * 4
    roi = (5, 42, 3, 40, 7, 31)

    def stacked() -> torch.Tensor:
        parts = list(pp.iter_source_slabs(logits, roi))
        assert parts[0][0] == roi[0]
        return torch.cat([p for _, p in parts], dim=1)

    monkeypatch.setattr(pp, "UP_SLAB", 8)
    wide = stacked()
    monkeypatch.setattr(pp, "UP_SLAB", 2)
    narrow = stacked()
    assert wide.shape == (7, 37, 37, 24)
    # equal up to the last bit of float32: torch's vectorised sigmoid computes the few
    # elements at the tail of each buffer on a scalar path, whose exp rounds differently
    torch.testing.assert_close(wide, narrow, rtol=0, atol=2e-7)
    assert float(wide.min()) > 0.0 and float(wide.max()) < 1.0
