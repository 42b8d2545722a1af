"""Stage-2 metrics: RSNA 2022 weighted log loss, AUC, operating point, calibration.

The RSNA 2022 Cervical Spine Fracture Detection metric
------------------------------------------------------
Every study contributes eight binary rows: ``C1`` .. ``C7`` and ``patient_overall``.
Each row carries a weight that depends on its label and its truth:

===================  ========  ========
row                  negative  positive
===================  ========  ========
C1 .. C7             1         2
patient_overall      7         14
===================  ========  ========

The competition host defined the score (Kaggle discussion 341854, reproduced by the
top solutions' loss functions) as, for every study ``s``,

.. math:: L_s = \\frac{\\sum_r w_{s,r}\\, \\ell(y_{s,r}, p_{s,r})}{\\sum_r w_{s,r}}

with ``l`` the binary log loss, and the final score is the **mean of** ``L_s`` **over the
studies**: each study's rows are averaged with their weights, then the studies are averaged.
Predictions are clipped to ``[1e-7, 1 - 1e-7]`` before the logarithm.

:func:`weighted_log_loss` implements exactly that. Rows whose truth is unknown (NaN,
e.g. a label missing from a partial dataset) are left out of their study's sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROWS: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall")
"""Row order of ``y_true`` / ``y_pred`` arrays in this module."""

NEG_WEIGHTS = np.array([1, 1, 1, 1, 1, 1, 1, 7], dtype=np.float64)
POS_WEIGHTS = np.array([2, 2, 2, 2, 2, 2, 2, 14], dtype=np.float64)
EPS = 1e-7


def _as_2d(a: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != len(ROWS):
        raise ValueError(
            f"{name} must have shape (n_studies, 8) with columns {ROWS}, got {arr.shape}"
        )
    return arr


def weighted_log_loss(
    y_true: np.ndarray | Sequence[Sequence[float]],
    y_pred: np.ndarray | Sequence[Sequence[float]],
) -> float:
    """RSNA 2022 weighted multi-label log loss (see the module docstring).

    Parameters
    ----------
    y_true
        ``(n_studies, 8)`` array of 0/1 truth in :data:`ROWS` order (NaN = unknown row).
    y_pred
        ``(n_studies, 8)`` array of probabilities in the same order.

    Returns
    -------
    float
        Mean over studies of each study's weighted mean row log loss.

    Raises
    ------
    ValueError
        When shapes differ, a truth value is not 0/1/NaN, or a prediction is NaN or
        outside ``[0, 1]``.
    """
    t = _as_2d(y_true, "y_true")
    p = _as_2d(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must have the same shape")
    known = ~np.isnan(t)
    if not np.all(np.isin(t[known], (0.0, 1.0))):
        raise ValueError("y_true must hold only 0, 1 or NaN")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("y_pred must hold probabilities in [0, 1] (no NaN)")
    if t.shape[0] == 0:
        raise ValueError("weighted_log_loss needs at least one study")
    tt = np.where(known, t, 0.0)
    pc = np.clip(p, EPS, 1.0 - EPS)
    loss = -(tt * np.log(pc) + (1.0 - tt) * np.log(1.0 - pc))
    w = np.where(tt > 0.5, POS_WEIGHTS, NEG_WEIGHTS) * known
    wsum = w.sum(axis=1)
    if np.any(wsum == 0):
        raise ValueError("every study needs at least one known row")
    per_study = (w * loss).sum(axis=1) / wsum
    return float(per_study.mean())


def auc(y_true: np.ndarray | Sequence[float], score: np.ndarray | Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Parameters
    ----------
    y_true
        0/1 labels.
    score
        Scores; higher means more likely positive.

    Returns
    -------
    float or None
        The AUC, or ``None`` when only one class is present (AUC undefined).
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and score {s.shape} must have the same length")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError("y_true must hold only 0 and 1")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    i = 0
    while i < s.size:  # average ranks over ties
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_sum_pos = ranks[y == 1].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sensitivity_specificity(
    y_true: np.ndarray | Sequence[float], prob: np.ndarray | Sequence[float], threshold: float
) -> dict[str, float | int | None]:
    """Sensitivity and specificity when ``prob >= threshold`` is called positive.

    Returns
    -------
    dict
        ``sensitivity``, ``specificity`` (``None`` when undefined), and the counts
        ``tp``, ``fn``, ``tn``, ``fp``, plus the ``threshold``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and prob {p.shape} must have the same length")
    called = p >= threshold
    tp = int(np.sum(called & (y == 1)))
    fn = int(np.sum(~called & (y == 1)))
    tn = int(np.sum(~called & (y == 0)))
    fp = int(np.sum(called & (y == 0)))
    return {
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def calibration_table(
    y_true: np.ndarray | Sequence[float], prob: np.ndarray | Sequence[float], n_bins: int = 10
) -> list[dict[str, float | int | None]]:
    """Reliability table over equal-width probability bins.

    Bin ``b`` holds predictions in ``[b/n, (b+1)/n)``; the last bin includes 1.0.

    Returns
    -------
    list of dict
        One row per bin: ``lower``, ``upper``, ``count``, ``mean_predicted`` and
        ``observed_rate`` (``None`` for empty bins).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and prob {p.shape} must have the same length")
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows: list[dict[str, float | int | None]] = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        rows.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": n,
                "mean_predicted": float(p[sel].mean()) if n else None,
                "observed_rate": float(y[sel].mean()) if n else None,
            }
        )
    return rows


def expected_calibration_error(
    y_true: np.ndarray | Sequence[float], prob: np.ndarray | Sequence[float], n_bins: int = 10
) -> float | None:
    """Expected calibration error over the equal-width bins of :func:`calibration_table`.

    ``ECE = sum_b (n_b / n) |mean predicted_b - observed rate_b|``; ``None`` without
    predictions.
    """
    rows = calibration_table(y_true, prob, n_bins)
    counts = [int(r["count"] or 0) for r in rows]
    total = sum(counts)
    if total == 0:
        return None
    err = 0.0
    for r, n in zip(rows, counts, strict=True):
        if n:  # a non-empty bin has both means
            gap = abs(float(r["mean_predicted"] or 0.0) - float(r["observed_rate"] or 0.0))
            err += n / total * gap
    return float(err)
