"""Stage-1 post-processing keeps its results while working in slabs (issue #9, memory)."""

from __future__ import annotations

import tracemalloc

import numpy as np
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
