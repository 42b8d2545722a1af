"""Stage-1 training smoke test (CLI) and the shipped demo model's round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ai.modelpkg import BUILTIN_REGISTRY, DEMO_LABEL
from ai.seg import SegModel
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


def test_demo_model_maps_masks_onto_the_source_grid(tmp_path: Path) -> None:
    """The shipped demo model, run on a DICOM round trip of a held-out synthetic study,
    overlaps the generator's truth on the source grid above the target Dice."""
    assert (BUILTIN_REGISTRY / "seg-demo" / "model.json").is_file()
    study = generate_study(90_001, StudySpec(rows=128, cols=128))
    vol = load_series(write_series(study, tmp_path / "series"))
    np.testing.assert_array_equal(vol.hu, study.volume.hu)
    model = SegModel.load("seg-demo", device="cpu")
    assert model.identity.demo
    out = model.predict(vol)
    truth = np.where(study.labels <= 7, study.labels, 0)
    dice = dice_per_label(out.label_map, truth)
    mean = float(np.nanmean(list(dice.values())))
    assert mean > TARGET_DICE, dice
    assert out.visible == study.visible
