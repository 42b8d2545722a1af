"""Stage-1 unit tests: geometry round trip, post-processing, model-package refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ai.errors import ModelLoadError
from ai.modelpkg import save_package
from ai.seg import InputSpec, SegModel, build_network, default_arch_params
from ai.seg.model import (
    ARCH_CLASS,
    _boxes,
    enforce_cranio_caudal_order,
    fill_enclosed_holes,
    keep_largest_components,
    label_counts,
)
from ai.seg.preprocess import canonical_view, iter_source_slabs, prepare_input, prepare_labels
from ai.seg.train import dice_per_label
from ai.types import VERTEBRAE, CTVolume

TINY = {"backbone": "efficientnet-b0", "decoder_channels": (16, 8, 8, 4, 4)}


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An axial phantom: 7 stacked boxes (C7 lowest) inside a soft-tissue cylinder."""
    d, h, w = 70, 90, 80
    hu = np.full((d, h, w), -1000, np.int16)
    yy, xx = np.mgrid[:h, :w]
    hu[:, (yy - 45) ** 2 + (xx - 40) ** 2 < 35**2] = 40
    lab = np.zeros((d, h, w), np.uint8)
    for v in range(1, 8):
        z0 = d - 3 - 9 * v
        lab[z0 : z0 + 7, 40:60, 25:55] = v
    hu[lab > 0] = 700
    affine = np.array(
        [[0, 0, 0.8, -30.0], [0, 0.8, 0, -40.0], [2.0, 0, 0, 100.0], [0, 0, 0, 1]]
    )  # k -> +S (ascending normal), j -> +P, i -> +L
    return hu, lab, affine


def _reorient(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Store the same scene with axes permuted and flipped (a sagittal-like layout)."""
    out = np.ascontiguousarray(np.transpose(arr, (2, 0, 1))[::-1, :, ::-1])
    n_i, n_k, n_j = arr.shape[2], arr.shape[0], arr.shape[1]
    # new voxel (a, b, c) = old (k=b, j=n_j-1-c, i=n_i-1-a)
    m = np.zeros((4, 4))
    m[0, 1] = 1
    m[1, 2] = -1
    m[1, 3] = n_j - 1
    m[2, 0] = -1
    m[2, 3] = n_i - 1
    m[3, 3] = 1
    _ = n_k
    return out, affine @ m


def _roundtrip(hu: np.ndarray, lab: np.ndarray, affine: np.ndarray, spec: InputSpec) -> np.ndarray:
    x, canon, roi = prepare_input(hu, affine, spec)
    y = prepare_labels(lab, affine, spec, roi)
    assert x.shape == (1, 1, *spec.size)
    assert y.shape == (7, *spec.size)
    logits = torch.logit(y.clamp(0.01, 0.99))
    out = np.zeros(hu.shape, np.uint8)
    view = canonical_view(out, canon)
    _z0, _z1, y0, y1, x0, x1 = roi
    for start, probs in iter_source_slabs(logits, roi):
        best, arg = probs.max(dim=0)
        view[start : start + probs.shape[1], y0:y1, x0:x1] = torch.where(
            best > 0.5, arg + 1, 0
        ).numpy()
    return out


def test_working_grid_round_trip_is_orientation_independent() -> None:
    hu, lab, affine = _phantom()
    spec = InputSpec(size=(32, 32, 32))
    back = _roundtrip(hu, lab, affine, spec)
    dice = dice_per_label(back, lab)
    # Boxes only 3 working voxels tall: soft targets still give sub-voxel boundaries.
    assert min(dice.values()) > 0.85 and np.mean(list(dice.values())) > 0.93, dice
    hu2, affine2 = _reorient(hu, affine)
    lab2, _ = _reorient(lab, affine)
    # Same patient-space content: the canonical input is identical.
    x1, _, _ = prepare_input(hu, affine, spec)
    x2, _, _ = prepare_input(hu2, affine2, spec)
    torch.testing.assert_close(x1, x2)
    back2 = _roundtrip(hu2, lab2, affine2, spec)
    np.testing.assert_array_equal(back2, _reorient(back, affine)[0])


def test_post_processing_largest_component_and_order() -> None:
    lab = np.zeros((30, 10, 10), np.uint8)
    lab[2:6, 2:8, 2:8] = 7
    lab[20:22, 2:4, 2:4] = 7  # a stray island of C7
    lab[24:28, 2:8, 2:8] = 1
    keep_largest_components(lab)
    assert (lab == 7).sum() == 4 * 36
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    assert enforce_cranio_caudal_order(lab, affine) == []  # C1 above C7 already
    flipped = lab.copy()
    flipped[lab == 1], flipped[lab == 7] = 7, 1
    notes = enforce_cranio_caudal_order(flipped, affine)
    assert notes and "reversed" in notes[0]
    np.testing.assert_array_equal(flipped, lab)


def test_one_misplaced_label_does_not_reverse_the_spine() -> None:
    """C1..C5 in order and a C6 speck above C1 (the extreme pair is out of order): the
    majority of pairs is in order, so nothing is reversed, with or without the speck
    taking part."""
    lab = np.zeros((60, 10, 10), np.uint8)
    for v in range(1, 6):
        z = 50 - 8 * v  # C1 highest
        lab[z : z + 6, 2:8, 2:8] = v
    lab[55:57, 2:4, 2:4] = 6  # 8 voxels above C1
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    before = lab.copy()
    assert enforce_cranio_caudal_order(lab, affine) == []
    assert enforce_cranio_caudal_order(lab, affine, min_voxels=50) == []
    np.testing.assert_array_equal(lab, before)
    # a whole spine stored upside down is still reversed, speck or not
    upside = np.where(lab > 0, 6 - lab, 0).astype(np.uint8)
    upside[lab == 6] = 6
    notes = enforce_cranio_caudal_order(upside, affine, min_voxels=50)
    assert notes and "reversed" in notes[0]
    for v in range(1, 6):  # stored as 6 - v, reversed to 8 - (6 - v)
        assert (upside[before == v] == v + 2).all()
    assert (upside[before == 6] == 2).all()


def test_post_processing_with_boxes_computed_once_matches_fresh_boxes() -> None:
    rng = np.random.default_rng(3)
    lab = np.zeros((40, 12, 12), np.uint8)
    for v in range(1, 8):  # C1 at the bottom, C7 on top: the order gets reversed
        z = 2 + (v - 1) * 5
        lab[z : z + 4, 2:9, 2:9] = v
        lab[z, 10 + rng.integers(0, 2), 11] = v  # a speck that is not the largest part
    fresh = lab.copy()
    keep_largest_components(fresh)
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    fresh_notes = enforce_cranio_caudal_order(fresh, affine)
    boxes = _boxes(lab)
    keep_largest_components(lab, boxes)
    notes = enforce_cranio_caudal_order(lab, affine, boxes)
    assert notes == fresh_notes and notes
    np.testing.assert_array_equal(lab, fresh)
    # after the reversal the boxes of the new labels are the old list reversed
    assert label_counts(lab, boxes[::-1]) == label_counts(lab) == {v: 4 * 49 for v in range(1, 8)}


def test_fill_enclosed_holes_fills_only_what_a_label_encloses() -> None:
    lab = np.zeros((12, 12, 24), np.uint8)
    lab[1:8, 1:8, 1:8] = 3
    lab[3:6, 3:6, 3:6] = 0  # enclosed marrow: filled
    lab[1:8, 1:8, 10:17] = 4
    lab[3:6, 3:8, 12:15] = 0  # open to the outside on one face: stays background
    lab[1:8, 1:8, 18:23] = 5
    lab[3:6, 3:6, 19:22] = 6  # another label inside it: kept
    before = lab.copy()
    fill_enclosed_holes(lab)
    assert (lab[3:6, 3:6, 3:6] == 3).all()
    assert (lab[3:6, 3:8, 12:15] == 0).all()
    assert (lab[3:6, 3:6, 19:22] == 6).all()
    changed = lab != before
    assert changed.sum() == 27


def test_fill_enclosed_holes_equals_scipy_fill_holes_on_random_shells() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(7)
    for _ in range(5):
        lab = np.zeros((20, 24, 22), np.uint8)
        z, y, x = np.mgrid[:20, :24, :22]
        r = ((z - 10) / 8) ** 2 + ((y - 12) / 10) ** 2 + ((x - 11) / 9) ** 2
        shell = (r < 1) & (r > 0.5) & (rng.random(lab.shape) > 0.03)  # some pin holes
        lab[shell] = 2
        expected = np.where(ndimage.binary_fill_holes(lab == 2), 2, 0).astype(np.uint8)
        fill_enclosed_holes(lab)
        np.testing.assert_array_equal(lab, expected)


def _tiny_package(folder: Path, size: int = 32) -> Path:
    torch.manual_seed(0)
    params = default_arch_params(TINY["backbone"], TINY["decoder_channels"])
    net = build_network(params)
    meta = {
        "name": "seg-tiny",
        "version": "0.0.1",
        "task": "seg",
        "architecture": {"class": ARCH_CLASS, "params": params},
        "input": InputSpec(size=(size, size, size)).to_json(),
        "postprocess": {"threshold": 0.5, "min_visible_mm3": 0.0},
    }
    return save_package(folder, net, meta, half=True)


def test_tiny_model_predicts_on_the_source_grid(tmp_path: Path) -> None:
    pkg = _tiny_package(tmp_path / "pkg")
    model = SegModel.load(pkg, device="cpu")
    assert model.identity.name == "seg-tiny"
    hu, _, affine = _phantom()
    out = model.predict(CTVolume(hu=hu, affine=affine))
    assert out.label_map.shape == hu.shape and out.label_map.dtype == np.uint8
    assert set(out.visible) == set(VERTEBRAE)
    assert out.label_map.max() <= 7
    assert out.seconds > 0


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    pkg = _tiny_package(tmp_path / "pkg")
    weights = pkg / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        SegModel.load(pkg, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backbone": "efficientnet-b1"}, "do not fit"),
        ({"decoder_channels": [32, 16, 8, 4, 4]}, "do not fit"),
        ({"out_channels": 5}, "out_channels=7"),
        ({"spatial_dims": 2}, "spatial_dims=3"),
        ({"no_such_param": 1}, "cannot build"),
    ],
)
def test_wrong_architecture_parameters_are_refused(
    tmp_path: Path, change: dict, message: str
) -> None:
    pkg = _tiny_package(tmp_path / "pkg")
    meta_path = pkg / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["architecture"]["params"].update(change)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=message):
        SegModel.load(pkg, device="cpu")


def test_input_spec_validates() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        InputSpec(size=(30, 32, 32))
    with pytest.raises(ValueError, match="normalization"):
        InputSpec(normalization="zscore")


@pytest.mark.parametrize("fill_holes", [True, False])
def test_bone_refinement_takes_the_boundary_from_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fill_holes: bool
) -> None:
    """The network's labels come from a coarse grid; with ``bone_hu`` the boundary follows
    the image on the source grid. The "network" here returns the coarse truth itself, so
    only the mapping back is under test: plain thresholding keeps the coarse grid's
    blocky boundary, refinement recovers the bone exactly, and marrow below ``bone_hu``
    that the cortex encloses is filled only when ``fill_holes`` is on."""
    hu, lab, affine = _phantom()
    marrow = (slice(51, 54), slice(44, 56), slice(30, 50))  # inside C2 (slices 49..55)
    assert (lab[marrow] == 2).all()
    hu[marrow] = 120
    spec = InputSpec(size=(32, 32, 32), two_pass=False)

    def run(post: dict) -> np.ndarray:
        pkg = _tiny_package(tmp_path / f"pkg{len(post)}{post.get('fill_holes')}")
        meta = json.loads((pkg / "model.json").read_text())
        meta["input"] = spec.to_json()
        meta["postprocess"] = post
        (pkg / "model.json").write_text(json.dumps(meta))
        model = SegModel.load(pkg, device="cpu")
        _, _, roi = prepare_input(hu, affine, spec)
        coarse = prepare_labels(lab, affine, spec, roi)
        monkeypatch.setattr(model, "logits", lambda x: torch.logit(coarse.clamp(0.01, 0.99)))
        return model.predict(CTVolume(hu=hu, affine=affine)).label_map

    plain = run({"threshold": 0.5, "min_visible_mm3": 0.0})
    refined = run(
        {"threshold": 0.5, "min_visible_mm3": 0.0, "bone_hu": 300.0, "fill_holes": fill_holes}
    )
    expected = lab.copy()
    if not fill_holes:
        expected[marrow] = 0
    d_plain, d_refined = dice_per_label(plain, lab), dice_per_label(refined, expected)
    assert min(d_plain.values()) < 0.95, d_plain  # the coarse grid's boundary
    assert min(d_refined.values()) > 0.99, d_refined
    assert (refined[lab == 0] == 0).all()  # soft tissue between the vertebrae stays out
    assert (refined[marrow] == (2 if fill_holes else 0)).all()


def test_invalid_postprocess_is_refused(tmp_path: Path) -> None:
    pkg = _tiny_package(tmp_path / "pkg")
    meta = json.loads((pkg / "model.json").read_text())
    meta["postprocess"]["region_threshold"] = 1.5
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="region_threshold must be within"):
        SegModel.load(pkg, device="cpu")
