"""``cspine evaluate cls``: score a stage-2 package on an RSNA-layout dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ai.cls.calibrate import calibration_report, head_outputs, ood_report, to_preds
from ai.cls.data import build_crop_cache
from ai.cls.model import ClsModel
from ai.cls.ood import Calibration
from ai.cls.train import score


def evaluate_dataset(
    root: str | Path,
    cls_model: ClsModel,
    cache_dir: str | Path,
    *,
    seg_model: Any = None,
    source: str = "stage1",
    threshold: float | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Evaluate a classifier on every study of a dataset.

    Crops come from ``seg_model`` predictions (``source="stage1"``) or the dataset's
    segmentations (``"truth"``), cached like in training. Vertebrae are scored as
    :meth:`ClsModel.predict` would answer: crops above the package's OOD threshold are not
    assessed, and the probabilities are calibrated when the package has temperatures.

    Returns
    -------
    dict
        The metrics of :func:`ai.cls.train.score`, the patient-mode comparison,
        ``calibration`` (expected calibration error and log-likelihood before and after
        the temperatures), ``ood`` (crops scored and abstained), ``uncalibrated`` (the
        headline metrics with temperature 1) and the identities of the models used.
    """
    items = build_crop_cache(
        root,
        cache_dir,
        cls_model.crop_config,
        seg_model=seg_model,
        source=source,
        progress=progress,
    )
    if not items:
        raise ValueError(f"no study of {root} could be evaluated")
    mode = cls_model.patient_mode
    outputs = head_outputs(cls_model.net, items, cls_model.device, cls_model.ood)
    preds = to_preds(outputs, cls_model.calibration, mode)
    inference = cls_model.meta.get("inference", {})
    prior = np.asarray(inference.get("prior", [0.5] * 8), dtype=np.float64)
    thr = float(inference.get("threshold", 0.5)) if threshold is None else float(threshold)
    result = score(items, preds, mode, prior, thr)
    result["patient_mode_comparison"] = {
        m: score(items, preds, m, prior, thr)["weighted_log_loss"] for m in ("head", "noisy_or")
    }
    raw = score(items, to_preds(outputs, Calibration(), mode), mode, prior, thr)
    result["uncalibrated"] = {
        k: raw[k]
        for k in ("weighted_log_loss", "patient_auc", "vertebra_auc_mean", "vertebra_auc_pooled")
    }
    result["calibration"] = {
        "vertebra_temperature": cls_model.calibration.vertebra_temperature,
        "patient_temperature": cls_model.calibration.patient_temperature,
        **calibration_report(items, outputs, cls_model.calibration, mode),
    }
    result["ood"] = ood_report(outputs, cls_model.ood.threshold if cls_model.ood else None)
    result["dataset"] = str(root)
    result["crop_source"] = source
    result["models"] = {"cls": vars(cls_model.identity)}
    if seg_model is not None:
        result["models"]["seg"] = vars(seg_model.identity)
    return result


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown_report(result: dict[str, Any]) -> str:
    """A human-readable Markdown report of :func:`evaluate_dataset` output."""
    lines = ["# Stage-2 evaluation", ""]
    cls_id = result.get("models", {}).get("cls", {})
    seg_id = result.get("models", {}).get("seg", {})
    demo = f" - {cls_id.get('description')}" if cls_id.get("demo") else ""
    lines += [
        f"- classifier: {cls_id.get('name')} {cls_id.get('version')} "
        f"(sha256 {str(cls_id.get('sha256', ''))[:12]}){demo}",
        f"- stage 1: {seg_id.get('name', 'n/a')} {seg_id.get('version', '')}; crops from "
        f"{result.get('crop_source')}",
        f"- studies: {result['n_studies']} ({result['n_patient_positive']} with a fracture); "
        f"vertebrae assessed {result['n_vertebrae_assessed']}, not assessed "
        f"{result['n_vertebrae_not_assessed']}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| weighted log loss (RSNA 2022) | {_fmt(result['weighted_log_loss'])} |",
        f"| patient AUC | {_fmt(result['patient_auc'])} |",
        f"| vertebra AUC (mean of C1..C7) | {_fmt(result['vertebra_auc_mean'])} |",
        f"| vertebra AUC (pooled) | {_fmt(result['vertebra_auc_pooled'])} |",
        f"| patient head used | {result['patient_mode']} |",
    ]
    for mode, loss in result.get("patient_mode_comparison", {}).items():
        lines.append(f"| log loss with patient mode `{mode}` | {_fmt(loss)} |")
    cal = result.get("calibration")
    if cal:
        raw = result.get("uncalibrated", {})
        lines += [
            f"| weighted log loss before calibration | {_fmt(raw.get('weighted_log_loss'))} |",
            f"| vertebra ECE before / after calibration | {_fmt(cal['vertebra_ece_before'])} / "
            f"{_fmt(cal['vertebra_ece_after'])} |",
            f"| patient ECE before / after calibration | {_fmt(cal['patient_ece_before'])} / "
            f"{_fmt(cal['patient_ece_after'])} |",
            f"| temperatures (vertebra, patient) | {_fmt(cal['vertebra_temperature'])}, "
            f"{_fmt(cal['patient_temperature'])} |",
        ]
    ood = result.get("ood")
    if ood:
        thr = "none" if ood["threshold"] is None else f"{ood['threshold']:.2f}"
        lines.append(
            f"| crops abstained out of distribution (threshold {thr}) | "
            f"{ood['n_abstained']} of {ood['n_crops']} ({_fmt(ood['abstention_rate'])}) |"
        )
    lines += ["", "## Per-vertebra AUC", "", "| vertebra | AUC |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["vertebra_auc"].items()]
    for level in ("patient", "vertebra"):
        op = result[f"{level}_operating_point"]
        lines += [
            "",
            f"## {level.capitalize()} operating point (p >= {op['threshold']})",
            "",
            f"sensitivity {_fmt(op['sensitivity'])}, specificity {_fmt(op['specificity'])} "
            f"(TP {op['tp']}, FN {op['fn']}, TN {op['tn']}, FP {op['fp']})",
            "",
            f"### {level.capitalize()} calibration",
            "",
            "| bin | n | mean predicted | observed |",
            "|---|---|---|---|",
        ]
        for row in result[f"{level}_calibration"]:
            lines.append(
                f"| {row['lower']:.1f}-{row['upper']:.1f} | {row['count']} | "
                f"{_fmt(row['mean_predicted'])} | {_fmt(row['observed_rate'])} |"
            )
    return "\n".join(lines) + "\n"
