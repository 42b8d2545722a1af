"""``cspine train cls`` and ``cspine evaluate cls`` on a tiny synthetic RSNA-layout dataset."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from ai.cls import ClsModel
from ai.modelpkg import DEMO_LABEL
from ai.synthetic import StudySpec, generate_study, write_rsna_dataset
from dicom_node.cli import main


def test_train_then_evaluate_cls_from_truth_crops(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    spec = StudySpec.small(fracture_rate=0.5)
    write_rsna_dataset(
        # seed 5 is the one with a fracture (C2, with boxes); it lands in the training fold
        root,
        (generate_study(s, spec) for s in (5, 1, 2, 0)),
        transfer_syntax="explicit",
    )
    out = tmp_path / "pkg"
    cache = tmp_path / "cache"
    tiny = ["--depths", "1,1,1,1", "--dims", "8,8,16,16", "--lstm-hidden", "8"]
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["train", "cls", "--data", str(root), "--out", str(out), "--cache", str(cache),
         "--crop-source", "truth", "--epochs", "1", "--size", "32", "--slices", "3",
         "--folds", "2", "--seed", "5", "--demo", "--threads", "1", "--pretrain-steps",
         "50", "--pretrain-batch", "4", "--box-loss", "0.5", "--box-stage", "0", "--stem",
         "conv", *tiny],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["box_loss"] == 0.5 and meta["training"]["box_stage"] == 0
    assert meta["architecture"]["params"]["stem"] == "conv"
    pre = meta["training"]["pretrain_history"]
    assert [h["step"] for h in pre] == [50] and "box_loss" in pre[0]
    assert meta["description"] == DEMO_LABEL
    assert meta["training"]["seed"] == 5
    assert meta["training"]["crop_source"] == "ground truth"
    assert meta["training"]["command"].startswith("cspine train cls --data")
    assert meta["input"]["crop"]["n_slices"] == 3
    assert len(list((cache).glob("truth-*/*.npz"))) == 4
    ClsModel.load(out)  # loadable and verified

    report_json = tmp_path / "eval.json"
    report_md = tmp_path / "eval.md"
    res = runner.invoke(
        main,
        ["evaluate", "cls", "--data", str(root), "--cls-model", str(out), "--cache",
         str(cache), "--crop-source", "truth", "--json", str(report_json), "--markdown",
         str(report_md), "--threads", "1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(report_json.read_text())
    assert result["n_studies"] == 4
    assert 0.0 < result["weighted_log_loss"] < 5.0
    assert len(result["patient_calibration"]) == 10
    assert set(result["vertebra_auc"]) == {f"C{i}" for i in range(1, 8)}
    text = report_md.read_text()
    assert "weighted log loss (RSNA 2022)" in text and "Patient calibration" in text
