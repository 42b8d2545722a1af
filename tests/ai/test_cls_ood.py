"""Stage-2 OOD abstention and temperature calibration (tiny networks, real computations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ai import metrics
from ai.cls import ClsModel, CropConfig, extract_crops
from ai.cls.calibrate import calibrate_package, split_items
from ai.cls.data import StudyCrops
from ai.cls.model import ARCHITECTURE_CLASS
from ai.cls.net import FractureNet
from ai.cls.ood import (
    Calibration,
    OODStats,
    binary_nll,
    conformal_threshold,
    fit_ood,
    fit_temperature,
)
from ai.cls.train import fold_split
from ai.errors import ModelLoadError
from ai.modelpkg import save_package, sha256_file
from ai.synthetic import StudySpec, generate_study, write_rsna_dataset
from ai.types import CTVolume
from dicom_node.cli import main
from tests.ai.toy_crops import cached_crops, toy_study

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16], "lstm_hidden": 8}
CROP = CropConfig(size=32, n_slices=3, min_volume_mm3=10)


def test_fit_threshold_and_far_features() -> None:
    rng = np.random.default_rng(0)
    d = 12
    centres = rng.normal(0, 3, size=(7, d))
    scale = rng.uniform(0.5, 2.0, size=d)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        lv = rng.integers(0, 7, n)
        return centres[lv] + rng.normal(size=(n, d)) * scale, lv

    x_tr, lv_tr = draw(2000)
    stats, info = fit_ood(x_tr, lv_tr)
    assert info["n_crops"] == 2000 and info["dim"] == d and 0.0 <= info["shrinkage"] <= 1.0
    np.testing.assert_allclose(stats.means[:, 0], centres, atol=0.5)  # ~4 standard errors
    x_va, lv_va = draw(999)
    stats.threshold = conformal_threshold(stats.score(x_va, lv_va), 0.01)
    # the ceil((n+1)(1-rate))-th smallest of 999 scores: 990th, so 9 validation crops above
    assert int(stats.abstains(stats.score(x_va, lv_va)).sum()) == 9
    # fresh in-distribution crops abstain at about the rate; a squared Mahalanobis distance
    # of a d-dimensional Gaussian is chi-square(d): the threshold sits near its 99th centile
    x_te, lv_te = draw(5000)
    rate = stats.abstains(stats.score(x_te, lv_te)).mean()
    assert 0.003 < rate < 0.02
    assert 4.6 < stats.threshold < 5.6  # sqrt(chi2.ppf(0.99, 12)) = 5.09
    # far away: shifted by 5 standard deviations along one feature
    far = x_te[:50].copy()
    far[:, 3] += 8 * scale[3]
    assert stats.abstains(stats.score(far, lv_te[:50])).all()
    # a crop of one level scored against another level's mean is unlike it
    wrong = stats.score(x_te[:200], (lv_te[:200] + 3) % 7)
    assert np.median(wrong) > 2 * stats.threshold
    assert not OODStats(stats.means, stats.precision).abstains(wrong).any()  # no threshold
    with pytest.raises(ValueError, match="features"):
        stats.score(x_te[:, :5], lv_te)
    with pytest.raises(ValueError, match="rate"):
        conformal_threshold(np.ones(3), 0.0)


def test_fractured_crops_stay_in_distribution_with_class_means() -> None:
    # fractured crops (a tenth of the training crops) sit away from the intact ones
    rng = np.random.default_rng(2)
    d = 8
    centres = rng.normal(0, 3, size=(7, d))
    shift = np.zeros(d)
    shift[0] = 10.0

    def draw(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = rng.integers(0, 7, n)
        y = (rng.random(n) < 0.1).astype(float)
        return centres[lv] + y[:, None] * shift + rng.normal(size=(n, d)), lv, y

    x_tr, lv_tr, y_tr = draw(3000)
    x_va, lv_va, _ = draw(500)
    x_te, lv_te, y_te = draw(3000)
    rates = {}
    for name, targets in (("one mean", None), ("class means", y_tr)):
        stats, info = fit_ood(x_tr, lv_tr, targets)
        stats.threshold = conformal_threshold(stats.score(x_va, lv_va), 0.01)
        out = stats.abstains(stats.score(x_te, lv_te))
        rates[name] = (out[y_te == 1].mean(), out[y_te == 0].mean())
    assert info["classes"] == ["intact", "fractured"]
    assert stats.means.shape == (7, 2, d)
    # one mean per level: the fractures are what abstains; class means: almost none does
    assert rates["one mean"][0] > 0.04 and rates["one mean"][0] > 5 * rates["one mean"][1]
    assert rates["class means"][0] < 0.02 and rates["class means"][1] < 0.02


def test_temperature_lowers_ece_on_overconfident_logits() -> None:
    rng = np.random.default_rng(1)
    true_logit = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    over = 3.0 * true_logit  # an overconfident model: logits three times too large
    t = fit_temperature(y[:2000], over[:2000])
    assert 2.5 < t < 3.5
    p_before = 1 / (1 + np.exp(-over[2000:]))
    p_after = 1 / (1 + np.exp(-over[2000:] / t))
    ece_before = metrics.expected_calibration_error(y[2000:], p_before)
    ece_after = metrics.expected_calibration_error(y[2000:], p_after)
    assert ece_before > 0.08 and ece_after < 0.03 and ece_after < ece_before / 3
    assert binary_nll(y[2000:], over[2000:], t) < binary_nll(y[2000:], over[2000:])
    # AUC is untouched by a temperature
    assert metrics.auc(y[2000:], p_before) == pytest.approx(metrics.auc(y[2000:], p_after))
    assert fit_temperature(np.ones(5), over[:5]) == 1.0  # one class: nothing to fit
    assert metrics.expected_calibration_error([], []) is None
    assert metrics.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def _item(i: int) -> StudyCrops:
    vol, lm, labels = toy_study(i, i % 7 if i % 3 == 0 else None, bone_jitter=True)
    return cached_crops(i, vol, lm, labels, CROP)


def _package(path: Path, seed: int = 0) -> Path:
    """An untrained tiny package as ``cspine train cls`` writes one (no OOD section)."""
    torch.manual_seed(seed)
    params = {"in_chans": CROP.channels, **TINY}
    meta = {
        "name": "cls-tiny",
        "version": "0.0.1",
        "task": "cls",
        "demo": True,
        "description": "synthetic demo weights, not for clinical use",
        "architecture": {"class": ARCHITECTURE_CLASS, "params": params},
        "input": {"crop": CROP.to_dict()},
        "inference": {"patient_mode": "head", "threshold": 0.5, "prior": [0.2] * 8},
        "training": {"folds": 2, "fold": 0, "seed": 3},
        "intended_use": {"stage": "stage2", "summary": "toy"},
    }
    save_package(path, FractureNet(**params), meta, half=True)
    return path


def _reference(model: ClsModel, vol: CTVolume, lm: np.ndarray) -> tuple[np.ndarray, float]:
    """What ``predict`` computed before OOD and calibration existed: one full forward."""
    batch = extract_crops(vol, lm, model.crop_config)
    with torch.inference_mode():
        out = model.net(batch.crops, torch.from_numpy(batch.present)[None])
    v = torch.sigmoid(out["vertebra_logits"].float())[0].numpy().astype(np.float64)
    return v[batch.present], float(torch.sigmoid(out["patient_logits"].float())[0])


def test_old_package_loads_and_predicts_exactly_as_before(tmp_path: Path) -> None:
    model = ClsModel.load(_package(tmp_path / "old"), device="cpu")
    assert model.ood is None and model.calibration == Calibration()
    vol, lm, _ = toy_study(123, 2, bone_jitter=True)
    lm[lm == 7] = 0
    verdicts, patient = model.predict(vol, lm)
    ref_v, ref_p = _reference(model, vol, lm)
    assert patient == ref_p  # bit for bit
    assert [v.probability for v in verdicts[:6]] == list(ref_v)
    assert all(v.ood_score is None and v.reason_code is None for v in verdicts[:6])
    assert verdicts[6].reason_code == "not_in_fov" and verdicts[6].probability is None


def test_calibrated_package_abstains_far_crops_and_reruns_the_patient_head(
    tmp_path: Path,
) -> None:
    src = _package(tmp_path / "src")
    items = [_item(i) for i in range(24)]
    train_items, val_items = items[:16], items[16:]
    meta = calibrate_package(
        src, tmp_path / "cal", train_items, val_items, version="0.0.2", rate=0.1,
        record={"command": "test"},
    )  # fmt: skip
    assert meta["version"] == "0.0.2" and meta["intended_use"]["summary"] == "toy"
    assert meta["weights"] == json.loads((src / "model.json").read_text())["weights"]
    assert sha256_file(tmp_path / "cal" / "model.safetensors") == meta["weights"]["sha256"]
    assert meta["ood"]["fit"]["n_studies"] == 16 and meta["ood"]["validation"]["n_studies"] == 8
    assert meta["ood"]["validation"]["n_crops"] == 56
    assert meta["ood"]["validation"]["false_abstention_rate"] <= 0.1
    assert meta["calibration"]["fit"]["validation_study_uids"] == [str(i) for i in range(16, 24)]
    model = ClsModel.load(tmp_path / "cal", device="cpu")
    thr = model.ood.threshold
    assert thr == meta["ood"]["threshold"]
    tv = model.calibration.vertebra_temperature
    tp = model.calibration.patient_temperature
    assert tv == meta["calibration"]["vertebra_temperature"] > 0

    # an in-distribution study: every crop scored; assessed exactly when not above the
    # threshold (rate 0.1 tolerates a false abstention now and then)
    vol, lm, _ = toy_study(500, bone_jitter=True)
    verdicts, patient = model.predict(vol, lm)
    assert all(v.visible and v.ood_score is not None for v in verdicts)
    assert all(v.assessed == (v.ood_score <= thr) for v in verdicts)
    assert sum(v.assessed for v in verdicts) >= 5 and patient is not None

    # C3 replaced by texture the network never saw: it abstains, the others stay
    odd = vol.hu.copy()
    z = 2 + 9 * 2
    rng = np.random.default_rng(7)
    # (its middle slices only: the neighbours' context channels reach 2 slices into C3)
    odd[z + 2 : z + 6, 12:28, 12:28] = rng.integers(-1000, 3000, size=(4, 16, 16))
    odd_vol = CTVolume(hu=odd.astype(np.int16), affine=vol.affine)
    verdicts, patient = model.predict(odd_vol, lm)
    c3 = verdicts[2]
    assert not c3.assessed and c3.visible and c3.probability is None
    assert c3.reason_code == "ood" and c3.ood_score > thr
    assert (
        c3.reason
        == f"input unlike the training data (score {c3.ood_score:.1f}, threshold {thr:.1f})"
    )
    kept = [v for v in verdicts if v.assessed]
    assert len(kept) == 6 and all(v.ood_score <= thr for v in kept)
    # the patient probability is the head re-run on the 6 vertebrae left, with T_p
    batch = extract_crops(odd_vol, lm, model.crop_config)
    with torch.inference_mode():
        feats = model.net.encoder(batch.crops.flatten(0, 1)).view(7, CROP.n_slices, -1)
        keep = np.array([True, True, False, True, True, True, True])
        out = model.net.forward_features(
            feats[torch.from_numpy(keep)], torch.from_numpy(keep)[None]
        )
        full = model.net.forward_features(feats, torch.ones(1, 7, dtype=torch.bool))
    expect = float(torch.sigmoid(out["patient_logits"].float()[0] / tp))
    assert patient == pytest.approx(expect, rel=1e-6)
    assert patient != pytest.approx(float(torch.sigmoid(full["patient_logits"][0] / tp)), rel=1e-6)
    v = torch.sigmoid(out["vertebra_logits"].float()[0] / tv).numpy()
    np.testing.assert_allclose([k.probability for k in kept], v[keep], rtol=1e-6)

    # every vertebra unlike the training data: nothing assessed, no patient probability
    noise = np.random.default_rng(8).integers(-1000, 3000, size=vol.hu.shape).astype(np.int16)
    verdicts, patient = model.predict(CTVolume(hu=noise, affine=vol.affine), lm)
    assert patient is None
    assert all(v.reason_code == "ood" and v.probability is None for v in verdicts)

    # a tampered statistics file is refused like tampered weights
    (tmp_path / "cal" / "ood.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="sha256"):
        ClsModel.load(tmp_path / "cal")


def test_split_items_rebuilds_the_training_fold() -> None:
    items = [_item(i) for i in range(6)]
    items.insert(2, StudyCrops("empty", items[0].crops[:0], np.zeros(7, bool), np.zeros(8), []))
    tr, va = split_items(items, 3, 1, 5)
    kept = [it for it in items if it.present.any()]
    t_idx, v_idx = fold_split(len(kept), 3, 1, 5)
    assert [it.uid for it in tr] == [kept[i].uid for i in t_idx]
    assert [it.uid for it in va] == [kept[i].uid for i in v_idx]
    assert "empty" not in {it.uid for it in tr + va}


def test_calibrate_command_writes_a_loadable_package(tmp_path: Path) -> None:
    spec = StudySpec.small(fracture_rate=0.5)
    root = tmp_path / "rsna"
    write_rsna_dataset(
        root, (generate_study(s, spec) for s in range(6)), transfer_syntax="explicit"
    )
    src = _package(tmp_path / "src")
    out = tmp_path / "cal"
    res = CliRunner().invoke(
        main,
        ["calibrate", "cls", "--data", str(root), "--cls-model", str(src), "--out", str(out),
         "--version", "0.1.0", "--cache", str(tmp_path / "cache"), "--crop-source", "truth",
         "--rate", "0.2", "--threads", "1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["version"] == "0.1.0" and summary["vertebra_temperature"] > 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["ood"]["fit"]["n_studies"] + meta["ood"]["validation"]["n_studies"] == 6
    assert meta["ood"]["validation"]["n_studies"] == 3  # --folds 2 from the package
    assert "fold_split" in meta["calibration"]["fit"]["split"]
    assert meta["calibration"]["fit"]["command"].startswith("cspine calibrate cls --data")
    model = ClsModel.load(out)
    assert model.ood is not None and model.identity.version == "0.1.0"
    assert model.identity.sha256 == ClsModel.load(src).identity.sha256

    res = CliRunner().invoke(
        main, ["calibrate", "cls", "--cls-model", str(src), "--out", str(out), "--version", "1"]
    )
    assert res.exit_code != 0 and "--data" in res.output


def test_shipped_cls_demo_loads_with_its_ood_section() -> None:
    model = ClsModel.load("cls-demo", device="cpu")
    meta = model.meta
    assert meta["description"] == "synthetic demo weights, not for clinical use"
    assert meta["intended_use"]["stage"] == "stage2" and "training" in meta
    assert model.ood is not None and model.ood.threshold == meta["ood"]["threshold"]
    assert model.ood.means.shape == (7, 2, model.net.encoder.out_dim)  # intact, fractured
    assert np.all(np.isfinite(model.ood.precision))
    val = meta["ood"]["validation"]
    assert val["n_studies"] == 60 and val["false_abstention_rate"] <= 0.01
    assert meta["ood"]["fit"]["n_studies"] == meta["training"]["n_train_studies"]
    assert meta["calibration"]["fit"]["n_studies"] == meta["training"]["n_validation_studies"]
    assert model.calibration.vertebra_temperature == meta["calibration"]["vertebra_temperature"]
    # the weights are those of 2.1.0: only statistics and temperatures were added
    assert meta["calibration"]["derived_from"]["version"] == "2.1.0"
    assert meta["calibration"]["derived_from"]["sha256"] == model.identity.sha256
    # toy boxes of bone in noise are nothing like the synthetic necks it was trained on
    vol, lm, _ = toy_study(3, bone_jitter=True)
    verdicts, patient = model.predict(vol, lm)
    assert all(v.reason_code == "ood" and v.ood_score > model.ood.threshold for v in verdicts)
    assert patient is None
