"""Hand-computed checks of the stage-2 metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ai import metrics


def test_weighted_log_loss_single_study_by_hand() -> None:
    # C1 fractured (w=2), C2..C7 healthy (w=1 each), patient fractured (w=14).
    y = [1, 0, 0, 0, 0, 0, 0, 1]
    p = [0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]
    num = 2 * -math.log(0.8) + 6 * -math.log(0.9) + 14 * -math.log(0.9)
    expected = num / (2 + 6 + 14)
    assert metrics.weighted_log_loss([y], [p]) == pytest.approx(expected, rel=1e-12)


def test_weighted_log_loss_is_mean_of_per_study_losses() -> None:
    y1 = [0] * 8  # healthy study: weights 1 x7 + 7 = 14
    p1 = [0.5] * 8
    l1 = 14 * math.log(2) / 14
    y2 = [0, 0, 0, 0, 0, 0, 1, 1]  # C7 fractured: weights 6*1 + 2 + 14 = 22
    p2 = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # perfect, but clipped
    l2 = -math.log(1 - 1e-7)
    got = metrics.weighted_log_loss(np.array([y1, y2]), np.array([p1, p2]))
    assert got == pytest.approx((l1 + l2) / 2, rel=1e-9)
    # a pooled (row-weighted over all studies) mean would differ: 14*l1*... / 36
    pooled = (14 * l1 + 22 * l2) / 36
    assert got != pytest.approx(pooled, rel=1e-3)


def test_weighted_log_loss_clips_certain_wrong_predictions() -> None:
    y = [1, 0, 0, 0, 0, 0, 0, 1]
    p = [0.0, 0, 0, 0, 0, 0, 0, 0.0]
    expected = (2 + 14) * -math.log(1e-7) / 22 + 6 * -math.log(1 - 1e-7) / 22
    assert metrics.weighted_log_loss([y], [p]) == pytest.approx(expected, rel=1e-9)


def test_weighted_log_loss_ignores_unknown_rows_and_validates() -> None:
    y = [np.nan, 0, 0, 0, 0, 0, 0, 0]
    p = [0.99, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert metrics.weighted_log_loss([y], [p]) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="shape"):
        metrics.weighted_log_loss([[0] * 7], [[0.5] * 7])
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        metrics.weighted_log_loss([[2] * 8], [[0.5] * 8])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.weighted_log_loss([[0] * 8], [[1.5] * 8])


def test_auc_by_hand_with_ties() -> None:
    # positives 0.8, 0.4 ; negatives 0.4, 0.1 -> pairs: (0.8>0.4) 1, (0.8>0.1) 1,
    # (0.4=0.4) 0.5, (0.4>0.1) 1 -> 3.5 / 4
    assert metrics.auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert metrics.auc([0, 1], [0.9, 0.1]) == pytest.approx(0.0)
    assert metrics.auc([1, 1], [0.9, 0.1]) is None


def test_sensitivity_specificity_counts() -> None:
    out = metrics.sensitivity_specificity([1, 1, 1, 0, 0], [0.9, 0.5, 0.2, 0.6, 0.1], 0.5)
    assert (out["tp"], out["fn"], out["tn"], out["fp"]) == (2, 1, 1, 1)
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="threshold"):
        metrics.sensitivity_specificity([1], [0.5], 1.5)


def test_calibration_table_bins() -> None:
    rows = metrics.calibration_table([0, 1, 1, 0], [0.05, 0.95, 1.0, 0.55], n_bins=2)
    assert rows[0]["count"] == 1 and rows[0]["observed_rate"] == 0.0
    assert rows[1]["count"] == 3
    assert rows[1]["mean_predicted"] == pytest.approx((0.95 + 1.0 + 0.55) / 3)
    assert rows[1]["observed_rate"] == pytest.approx(2 / 3)
    empty = metrics.calibration_table([1], [0.5], n_bins=4)
    assert empty[0]["count"] == 0 and empty[0]["observed_rate"] is None
