"""Add OOD statistics and temperature calibration to a trained stage-2 package.

``cspine calibrate cls`` runs :func:`calibrate_package`: the weights are not touched
(the new package carries the same ``model.safetensors``, same sha256); ``model.json``
gains an ``ood`` section (statistics in ``ood.safetensors``, verified by sha256 like the
weights) and a ``calibration`` section. Which data each part saw:

* OOD means and covariance: the crops of the *training* studies (those the classifier
  was trained on), as cached, without augmentation.
* OOD threshold: the crops of the *validation* studies (see
  :func:`ai.cls.ood.conformal_threshold`).
* Temperatures: the validation studies, after the OOD abstention (as at inference).

See :mod:`ai.cls.ood` for the method.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai import metrics
from ai.cls.data import StudyCrops
from ai.cls.model import PATIENT_MODES, ClsModel, noisy_or
from ai.cls.net import FractureNet
from ai.cls.ood import (
    FEATURES,
    OOD_FILE,
    Calibration,
    HeadOutput,
    OODStats,
    binary_nll,
    conformal_threshold,
    crop_features,
    fit_ood,
    fit_temperature,
    logit,
    run_heads,
    study_hash,
)
from ai.cls.train import encode_items, fold_split
from ai.modelpkg import META_FILE

METHOD = (
    "mahalanobis, nearer of the intact and fractured means of the crop's level, "
    "shared Ledoit-Wolf covariance"
)


def split_items(
    items: Sequence[StudyCrops], folds: int, fold: int, seed: int
) -> tuple[list[StudyCrops], list[StudyCrops]]:
    """The training and validation studies of a fold, exactly as :func:`ai.cls.train.train`.

    Studies without an assessed vertebra are dropped first (as in training), then
    :func:`ai.cls.train.fold_split` splits the rest in their given (``train.csv``) order.
    """
    kept = [it for it in items if it.present.any()]
    tr, va = fold_split(len(kept), folds, fold, seed)
    return [kept[i] for i in tr], [kept[i] for i in va]


def crop_table(
    items: Sequence[StudyCrops], feats: Sequence[torch.Tensor]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack the OOD features of every crop.

    Returns
    -------
    tuple
        ``[N, D]`` features, ``[N]`` levels 0..6 and ``[N]`` fracture labels (0/1).
    """
    xs, levels, targets = [], [], []
    for it, f in zip(items, feats, strict=True):
        if f.shape[0] == 0:
            continue
        xs.append(crop_features(f))
        levels.append(np.nonzero(it.present)[0])
        targets.append(np.asarray(it.labels[:7])[it.present])
    if not xs:
        raise ValueError("no crop to compute OOD features from")
    return np.concatenate(xs), np.concatenate(levels), np.concatenate(targets)


def head_outputs(
    net: FractureNet,
    items: Sequence[StudyCrops],
    device: torch.device,
    ood: OODStats | None,
    feats: Sequence[torch.Tensor] | None = None,
) -> list[HeadOutput]:
    """Logits and OOD scores of every cached study, as :meth:`ClsModel.assess` computes them."""
    if feats is None:
        feats = encode_items(net, items, device)
    return [run_heads(net, f, it.present, ood, device) for it, f in zip(items, feats, strict=True)]


def to_preds(
    outputs: Sequence[HeadOutput], calibration: Calibration, patient_mode: str
) -> dict[str, np.ndarray]:
    """Predictions in the form of :func:`ai.cls.train.predict_cached` (NaN: not assessed)."""
    n = len(outputs)
    vert = np.full((n, 7), np.nan)
    pat = {m: np.full(n, np.nan) for m in PATIENT_MODES}
    for i, out in enumerate(outputs):
        probs, patient = calibration.probabilities(out, patient_mode)
        vert[i] = probs
        for m in PATIENT_MODES:
            if patient[m] is not None:
                pat[m][i] = patient[m]
    return {"vertebrae": vert, **{f"patient_{m}": a for m, a in pat.items()}}


def _patient_logits(
    outputs: Sequence[HeadOutput], patient_mode: str, vertebra_temperature: float
) -> np.ndarray:
    """The logit the patient temperature divides, per study (NaN when none is left)."""
    z = np.full(len(outputs), np.nan)
    for i, out in enumerate(outputs):
        if out.patient_logit is None:
            continue
        if patient_mode == "head":
            z[i] = out.patient_logit
        else:
            v = 1.0 / (1.0 + np.exp(-out.vertebra_logits[out.assessed] / vertebra_temperature))
            z[i] = float(logit(noisy_or(v)))
    return z


def calibration_report(
    items: Sequence[StudyCrops],
    outputs: Sequence[HeadOutput],
    calibration: Calibration,
    patient_mode: str,
    n_bins: int = 10,
) -> dict[str, Any]:
    """ECE and log-likelihood of the vertebrae and the patient, before and after calibration.

    "Before" uses the same abstentions with temperature 1, so the two differ only by the
    temperatures.
    """
    y = np.stack([it.labels for it in items]).astype(np.float64)
    out: dict[str, Any] = {"n_bins": n_bins}
    for name, cal in (("before", Calibration()), ("after", calibration)):
        preds = to_preds(outputs, cal, patient_mode)
        v = preds["vertebrae"]
        sel = np.isfinite(v)
        p = preds[f"patient_{patient_mode}"]
        psel = np.isfinite(p)
        out[f"vertebra_ece_{name}"] = metrics.expected_calibration_error(
            y[:, :7][sel], v[sel], n_bins
        )
        out[f"patient_ece_{name}"] = metrics.expected_calibration_error(y[psel, 7], p[psel], n_bins)
        out[f"vertebra_nll_{name}"] = _nll(y[:, :7][sel], v[sel])
        out[f"patient_nll_{name}"] = _nll(y[psel, 7], p[psel])
    out["n_vertebrae"] = int(
        np.isfinite(to_preds(outputs, calibration, patient_mode)["vertebrae"]).sum()
    )
    return out


def _nll(y: np.ndarray, p: np.ndarray) -> float | None:
    if y.size == 0:
        return None
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def ood_report(outputs: Sequence[HeadOutput], threshold: float | None) -> dict[str, Any]:
    """Crops scored, crops abstained and their rate."""
    scores = np.concatenate([o.ood_scores[np.isfinite(o.ood_scores)] for o in outputs])
    n_abs = int(sum(int(o.abstained.sum()) for o in outputs))
    n_crops = n_abs + int(sum(int(o.assessed.sum()) for o in outputs))
    rep: dict[str, Any] = {
        "threshold": threshold,
        "n_crops": n_crops,
        "n_abstained": n_abs,
        "abstention_rate": n_abs / n_crops if n_crops else None,
        "n_studies_with_abstention": int(sum(bool(o.abstained.any()) for o in outputs)),
    }
    if scores.size:
        rep["score_quantiles"] = _quantiles(scores)
    return rep


def calibrate_package(
    package: str | Path,
    out_dir: str | Path,
    train_items: Sequence[StudyCrops],
    val_items: Sequence[StudyCrops],
    *,
    version: str,
    rate: float = 0.01,
    record: dict[str, Any] | None = None,
    registry: str | Path | None = None,
) -> dict[str, Any]:
    """Fit OOD statistics, the threshold and the temperatures; write a new package.

    Parameters
    ----------
    package
        Source stage-2 package (folder or installed name).
    out_dir
        New package folder (created; must not be the source).
    train_items
        Cached crops of studies the classifier was trained on (OOD mean and covariance).
    val_items
        Cached crops of validation studies, never trained on (threshold, temperatures).
    version
        Version of the new package.
    rate
        Tolerated false-abstention rate on in-distribution crops.
    record
        Extra facts merged into ``calibration.fit`` (data paths, command, seeds...).
    registry
        Registry to resolve ``package`` in.

    Returns
    -------
    dict
        The written ``model.json``.
    """
    model = ClsModel.load(package, registry=registry, device="cpu")
    src = model.package.path
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out must differ from the source package {src}")
    val_uids = [it.uid for it in val_items]
    overlap = {it.uid for it in train_items} & set(val_uids)
    if overlap:
        raise ValueError(f"{len(overlap)} studies are in both the training and validation data")
    net, dev = model.net, torch.device("cpu")
    tr_feats = encode_items(net, train_items, dev)
    x_tr, lv_tr, y_tr = crop_table(train_items, tr_feats)
    stats, fit_info = fit_ood(x_tr, lv_tr, y_tr)
    va_feats = encode_items(net, val_items, dev)
    x_va, lv_va, _ = crop_table(val_items, va_feats)
    val_scores = stats.score(x_va, lv_va)
    stats.threshold = conformal_threshold(val_scores, rate)
    train_scores = stats.score(x_tr, lv_tr)
    outputs = head_outputs(net, val_items, dev, stats, va_feats)
    # temperatures on the validation vertebrae still assessed, and their studies
    y = np.stack([it.labels for it in val_items]).astype(np.float64)
    vl = np.stack([o.vertebra_logits for o in outputs])
    sel = np.isfinite(vl)
    tv = fit_temperature(y[:, :7][sel], vl[sel])
    pz = _patient_logits(outputs, model.patient_mode, tv)
    psel = np.isfinite(pz)
    tp = fit_temperature(y[psel, 7], pz[psel])
    calibration = Calibration(tv, tp)
    report = calibration_report(val_items, outputs, calibration, model.patient_mode)
    out.mkdir(parents=True, exist_ok=True)
    weights = model.package.meta["weights"]["file"]
    shutil.copyfile(src / weights, out / weights)
    sha = stats.save(out / OOD_FILE)
    n_abs = int((val_scores > stats.threshold).sum())
    meta = json.loads(json.dumps(model.package.meta))
    meta["version"] = version
    rec = dict(record or {})
    meta["ood"] = {
        "method": METHOD,
        "features": FEATURES,
        "features_doc": "ConvNeXt encoder output per slice, averaged over the crop's slices; "
        "score = Mahalanobis distance to the nearer of the intact and fractured training "
        "means of the crop's vertebra level",
        "file": OOD_FILE,
        "sha256": sha,
        "dtype": "float32",
        "threshold": stats.threshold,
        "rule": "a crop whose score is above the threshold is not assessed (reason_code ood)",
        "target_false_abstention_rate": rate,
        "threshold_rule": "split-conformal: the ceil((n+1)(1-rate))-th smallest validation score",
        "fit": {
            "data": "training studies (the classifier's training fold)",
            "n_studies": len(train_items),
            "studies_sha256": study_hash([it.uid for it in train_items]),
            **fit_info,
            "score_quantiles": _quantiles(train_scores),
        },
        "validation": {
            "data": "validation studies (never trained on; threshold set here)",
            "n_studies": len(val_items),
            "studies_sha256": study_hash(val_uids),
            "n_crops": int(val_scores.size),
            "n_abstained": n_abs,
            "false_abstention_rate": n_abs / val_scores.size,
            "score_quantiles": _quantiles(val_scores),
        },
    }
    meta["calibration"] = {
        "method": "temperature scaling (p = sigmoid(logit / T)), NLL on the validation studies",
        "vertebra_temperature": tv,
        "patient_temperature": tp,
        "patient_mode": model.patient_mode,
        "fit": {
            "data": "validation studies, after the OOD abstention (the same as ood.validation)",
            "n_studies": len(val_items),
            "n_studies_with_patient_logit": int(psel.sum()),
            "studies_sha256": study_hash(val_uids),
            "validation_study_uids": val_uids,
            "vertebra_nll_at_t1": binary_nll(y[:, :7][sel], vl[sel]),
            **rec,
        },
        "validation": {
            **report,
            "note": "in-sample: the temperatures were fitted on these studies; "
            "metrics.validation above is of the package before calibration",
        },
        "derived_from": vars(model.identity),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _quantiles(s: np.ndarray) -> dict[str, float]:
    q = np.quantile(np.asarray(s, dtype=np.float64), [0.5, 0.9, 0.99, 1.0])
    return {k: float(v) for k, v in zip(("50", "90", "99", "max"), q, strict=True)}
