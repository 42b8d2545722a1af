"""Stage-1 training smoke test (CLI) and the shipped demo model's round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ai.modelpkg import BUILTIN_REGISTRY, DEMO_LABEL
from ai.seg import InputSpec, SegModel
from ai.seg.preprocess import (
    canonical_transform,
    canonical_view,
    iter_source_slabs,
    prepare_input,
    prepare_labels,
    roi_from_mask,
)
from ai.seg.train import dice_per_label, split_folds
from ai.synthetic import StudySpec, generate_study, write_rsna_dataset, write_series
from ai.volume import load_series
from dicom_node.cli import main

TARGET_DICE = 0.90


def test_split_folds_is_deterministic_and_disjoint() -> None:
    uids = [f"1.2.{i}" for i in range(10)]
    train, val = split_folds(uids, 5, 1, seed=3)
    assert sorted(train + val) == sorted(uids) and not set(train) & set(val)
    assert split_folds(list(reversed(uids)), 5, 1, seed=3) == (train, val)
    with pytest.raises(ValueError, match="fold"):
        split_folds(uids, 5, 5, seed=0)


def test_train_cli_two_steps_writes_a_loadable_package(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    write_rsna_dataset(root, (generate_study(s, StudySpec.small()) for s in (11, 12)))
    out = tmp_path / "pkg"
    args = [
        "train", "seg", "--data", str(root), "--out", str(out), "--size", "32",
        "--decoder-channels", "16,8,8,4,4", "--folds", "1", "--epochs", "1",
        "--max-steps", "2", "--seed", "5", "--device", "cpu", "--demo", "--no-progress",
        "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "model.json").read_text())
    # 2 studies x (full view + 2 spine crops) = 6 samples: 3 steps per epoch, stopped at 2.
    assert meta["training"]["steps"] == 2
    assert meta["training"]["train_samples"] == 6
    assert meta["training"]["seed"] == 5
    assert "--seed" in meta["training"]["command"]
    assert meta["label"] == DEMO_LABEL and meta["demo"] is True
    assert meta["input"]["size"] == [32, 32, 32]
    assert meta["training"]["domain_randomisation"] is None
    assert (tmp_path / "work" / "checkpoint.pt").is_file()
    assert list((tmp_path / "cache").rglob("*.npz"))
    model = SegModel.load(out, device="cpu")
    assert model.identity.demo
    study = generate_study(13, StudySpec.small())
    pred = model.predict(study.volume)
    assert pred.label_map.shape == study.volume.hu.shape

    # Resume continues from the checkpoint instead of starting over.
    again = CliRunner().invoke(main, [*args[:-4], "--resume", "--epochs", "2", "--max-steps",
                                      "4", "--work-dir", str(tmp_path / "work")])  # fmt: skip
    assert again.exit_code == 0, again.output
    meta = json.loads((out / "model.json").read_text())
    assert [h["epoch"] for h in meta["training"]["history"]] == [1, 2]
    assert meta["training"]["steps"] == 4

    # Fine-tuning starts from a verified package with the same architecture and input.
    first = SegModel.load(out, device="cpu")
    tuned = tmp_path / "tuned"
    common = [*args[:4], "--size", "32", "--decoder-channels", "16,8,8,4,4", "--folds", "1",
              "--epochs", "1", "--max-steps", "1", "--device", "cpu", "--no-progress",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    init = CliRunner().invoke(main, [*common, "--out", str(tuned), "--init", str(out),
                                     "--work-dir", str(tmp_path / "work2"),
                                     "--domain-randomisation"])  # fmt: skip
    assert init.exit_code == 0, init.output
    meta = json.loads((tuned / "model.json").read_text())
    assert meta["training"]["domain_randomisation"]["p"] == 0.8
    assert "domain randomisation" in meta["training"]["augmentation"]
    assert meta["training"]["init"]["sha256"] == first.identity.sha256
    assert "--init" in meta["training"]["command"]
    other = [*common, "--out", str(tmp_path / "x"), "--init", str(out),
             "--work-dir", str(tmp_path / "work3")]  # fmt: skip
    other[other.index("16,8,8,4,4")] = "16,8,8,8,4"
    refused = CliRunner().invoke(main, other)
    assert refused.exit_code != 0
    assert "architecture parameters" in refused.output
    assert not (tmp_path / "x" / "model.json").exists()


def test_mask_to_grid_round_trip_through_dicom(tmp_path: Path) -> None:
    """Geometry and flips: a synthetic study goes through DICOM and the loader, its truth is
    resampled to the working grid over the spine ROI exactly as inference does, and the
    soft masks mapped back onto the source grid overlap the truth above the target Dice.
    The study is feet-first (flipped axes), so a wrong flip or permutation would fail."""
    study = generate_study(90_001, StudySpec(rows=128, cols=128, patient_position="FFS"))
    vol = load_series(write_series(study, tmp_path / "series"))
    np.testing.assert_array_equal(vol.hu, study.volume.hu)
    np.testing.assert_allclose(vol.affine, study.volume.affine, atol=1e-3)
    truth = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
    spec = InputSpec(size=(96, 64, 64))
    canon = canonical_transform(vol.affine)
    view = canonical_view(truth, canon)
    full = (0, view.shape[0], 0, view.shape[1], 0, view.shape[2])
    roi = roi_from_mask(view > 0, full, view.shape, canon.spacing, spec.roi_margin_mm)
    assert roi is not None
    _, canon, roi = prepare_input(vol.hu, vol.affine, spec, roi=roi)
    soft = prepare_labels(truth, vol.affine, spec, roi)
    logits = torch.logit(soft.clamp(0.01, 0.99))
    back = np.zeros(vol.hu.shape, np.uint8)
    out_view = canonical_view(back, canon)
    _z0, _z1, y0, y1, x0, x1 = roi
    for start, probs in iter_source_slabs(logits, roi):
        best, arg = probs.max(dim=0)
        out_view[start : start + probs.shape[1], y0:y1, x0:x1] = torch.where(
            best > 0.5, arg + 1, 0
        ).numpy()
    dice = dice_per_label(back, truth)
    assert float(np.nanmean(list(dice.values()))) > TARGET_DICE, dice


def test_shipped_demo_model_predicts_on_the_source_grid(tmp_path: Path) -> None:
    assert (BUILTIN_REGISTRY / "seg-demo" / "model.json").is_file()
    model = SegModel.load("seg-demo", device="cpu")
    assert model.identity.demo
    assert model.package.meta["label"] == DEMO_LABEL
    study = generate_study(90_002, StudySpec(rows=128, cols=128))
    out = model.predict(study.volume)
    assert out.label_map.shape == study.volume.hu.shape
    assert out.label_map.dtype == np.uint8
    assert set(out.visible) == {"C1", "C2", "C3", "C4", "C5", "C6", "C7"}


def test_evaluate_cli_reports_dice_and_records_only_the_packages_own_settings(
    tmp_path: Path,
) -> None:
    root = tmp_path / "rsna"
    write_rsna_dataset(
        root, (generate_study(s, StudySpec.small(field_of_view="full")) for s in (21, 22))
    )
    pkg = tmp_path / "seg-demo"
    shutil.copytree(BUILTIN_REGISTRY / "seg-demo", pkg)
    base = ["evaluate", "seg", "--data", str(root), "--model", str(pkg), "--device", "cpu",
            "--no-progress"]  # fmt: skip

    def report(*extra: str) -> dict:
        out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
        md = out.with_suffix(".md")
        result = CliRunner().invoke(
            main, [*base, "--json", str(out), "--markdown", str(md), *extra]
        )
        assert result.exit_code == 0, result.output
        assert "| mean |" in md.read_text()
        return json.loads(out.read_text())

    own = report()
    assert own["n_studies"] == 2
    assert own["postprocess"] == SegModel.load(pkg, device="cpu").post.to_json()
    per = [own["dice"][n] for n in ("C1", "C2", "C3", "C4", "C5", "C6", "C7")]
    assert all(0.0 <= d <= 1.0 for d in per)
    assert own["dice"]["mean"] == pytest.approx(float(np.mean(per)))

    other = report("--bone-hu", "3000")  # nothing is that dense: every vertebra is lost
    assert other["postprocess"]["bone_hu"] == 3000.0
    assert other["dice"]["mean"] == 0.0

    plain = report("--bone-hu", "off")  # the probability threshold alone
    assert plain["postprocess"]["bone_hu"] is None
    word = CliRunner().invoke(main, [*base, "--bone-hu", "dense"])
    assert word.exit_code == 2 and "a number or 'off'" in word.output

    mixed = CliRunner().invoke(main, [*base, "--record", "--bone-hu", "150"])
    assert mixed.exit_code != 0 and "--record" in mixed.output
    beyond = CliRunner().invoke(main, [*base, "--bone-hu", "5000"])
    assert beyond.exit_code == 2 and "bone_hu must be within -1024..3071" in beyond.output
    lone = CliRunner().invoke(main, [*base, "--region-threshold", "0.2"])
    assert lone.exit_code != 0 and "need --bone-hu" in lone.output

    recorded = CliRunner().invoke(main, [*base, "--record"])
    assert recorded.exit_code == 0, recorded.output
    meta = json.loads((pkg / "model.json").read_text())
    held = meta["metrics"]["heldout_dice_original_grid"]
    assert held["mean"] == pytest.approx(own["dice"]["mean"]) and held["n_studies"] == 2
    SegModel.load(pkg, device="cpu")  # model.json changed, the weights' hash still holds
