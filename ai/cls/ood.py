"""Stage-2 abstention out of distribution, and calibrated probabilities.

**Out-of-distribution score.** Each vertebra crop gets a feature vector: the ConvNeXt
slice features (the pooled output of the encoder, ``encoder.out_dim`` values per slice)
averaged over the crop's ``n_slices`` slices. Its score is the Mahalanobis distance to
the nearer of two class means of the training crops of the *same vertebra level*
(C1..C7): the crops of fractured and of intact vertebrae, with one covariance shared by
all, estimated with Ledoit-Wolf shrinkage:

``score = min_c sqrt((f - mu_level,c)^T P (f - mu_level,c))``

Why this choice:

* The encoder features are the last representation that describes the *image* (the
  slice LSTM and the heads are trained to say "fractured or not", and collapse what they
  do not need for that). Mahalanobis distance on penultimate features is the standard,
  cheap detector of inputs unlike the training data (Lee et al., NeurIPS 2018); it needs
  no retraining and no outlier examples.
* Averaging over the slices gives one vector per vertebra, which is the unit that is
  assessed or not; the slice order (which the LSTM uses) does not matter for "is this
  image like the training images".
* The level is known at inference (stage 1 labelled the crop), and C1 does not look like
  C7: class-conditional means with a tied covariance (as Lee et al.) make the model
  tighter than one mean for all crops, and a crop that stage 1 mislabelled scores high.
* The fracture class matters for safety: with one mean per level, a fractured crop (a
  minority of the training crops) can lie far from the mean *because it is fractured*,
  and the fractured vertebra would be the one that abstains. The minimum over the
  fractured and the intact mean (Lee et al.'s class-conditional score) removes that
  reason (fitting without fracture labels gives one mean per level). It does not make
  hard crops score low: on the shipped package's held-out studies the crops that still
  abstain are fractured vertebrae that lie far from both means (see the README).
* With a few thousand training crops and hundreds of feature dimensions, the sample
  covariance is ill-conditioned; Ledoit-Wolf shrinks it towards a scaled identity with a
  data-driven weight, so its inverse is stable.

**Threshold.** Set on validation crops only, as a split-conformal quantile: with ``n``
validation scores, the threshold is the ``ceil((n + 1) (1 - rate))``-th smallest, so an
in-distribution crop exchangeable with the validation crops exceeds it with probability
at most ``rate`` (``rate`` = the tolerated false-abstention rate). A crop whose score is
*above* the threshold is not assessed.

**Calibration.** Temperature scaling (Guo et al., ICML 2017): one temperature for the
vertebra logits and one for the patient logit, each fitted on the validation fold by
minimising the negative log-likelihood (``p = sigmoid(logit / T)``). The ranking (AUC) is
unchanged. The patient temperature applies to the package's patient mode: the head's
logit, or for ``noisy_or`` the logit of the noisy-or of the calibrated vertebrae.

Packages without these sections behave exactly as before (no score threshold,
temperature 1).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from scipy import optimize

from ai.cls.net import FractureNet
from ai.errors import ModelLoadError
from ai.modelpkg import verify_file
from config.digest import sha256_file

OOD_FILE = "ood.safetensors"
FEATURES = "convnext_mean_over_slices"
"""Name of the feature the OOD statistics are computed on (recorded in ``model.json``)."""


def crop_features(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-crop OOD feature vectors from encoder features.

    Parameters
    ----------
    feats
        ``[N, S, D]`` ConvNeXt features of the slices of ``N`` crops.

    Returns
    -------
    numpy.ndarray
        float64 ``[N, D]``: the mean over the ``S`` slices.
    """
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().float().cpu().numpy()
    return np.asarray(feats, dtype=np.float64).mean(axis=1)


@dataclass
class OODStats:
    """Mahalanobis statistics of the training crops.

    Attributes
    ----------
    means
        float64 ``[7, C, D]``: mean feature per vertebra level C1..C7 and class (``C = 2``:
        intact, fractured; ``C = 1`` without labels). ``[7, D]`` is taken as ``C = 1``.
    precision
        float64 ``[D, D]``: inverse of the shared (shrunk) covariance.
    threshold
        Scores above it abstain (``None``: not set yet).
    """

    means: np.ndarray
    precision: np.ndarray
    threshold: float | None = None

    def __post_init__(self) -> None:
        self.means = np.asarray(self.means, dtype=np.float64)
        if self.means.ndim == 2:
            self.means = self.means[:, None, :]
        if self.means.ndim != 3 or self.means.shape[0] != 7:
            raise ValueError(f"means must be [7, C, D], got {list(self.means.shape)}")

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.means.shape[2])

    def score(self, features: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each crop to its level's training mean.

        Parameters
        ----------
        features
            ``[N, D]`` crop features (:func:`crop_features`).
        levels
            ``[N]`` vertebra index 0..6 (C1..C7) of each crop.

        Returns
        -------
        numpy.ndarray
            float64 ``[N]`` distances (>= 0).
        """
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {list(f.shape)}")
        r = f[:, None, :] - self.means[np.asarray(levels, dtype=np.int64)]  # [N, C, D]
        d2 = np.einsum("ncd,de,nce->nc", r, self.precision, r).min(axis=1)
        return np.sqrt(np.maximum(d2, 0.0))

    def abstains(self, scores: np.ndarray) -> np.ndarray:
        """Boolean mask: which scores are above the threshold (none without one)."""
        s = np.asarray(scores, dtype=np.float64)
        if self.threshold is None:
            return np.zeros(s.shape, dtype=bool)
        return s > self.threshold

    def save(self, path: str | Path) -> str:
        """Write ``means`` and ``precision`` (float32) to a safetensors file; return its sha256."""
        tensors = {
            "means": np.ascontiguousarray(self.means, dtype=np.float32),
            "precision": np.ascontiguousarray(self.precision, dtype=np.float32),
        }
        save_file(tensors, str(path))
        Path(path).chmod(0o644)  # readable like the weights (the writer leaves it 0600)
        return sha256_file(Path(path))

    @classmethod
    def load(cls, path: str | Path, sha256: str, threshold: float | None) -> OODStats:
        """Read statistics written by :meth:`save`, verifying the sha256 first.

        Raises
        ------
        ModelLoadError
            When the file is missing, its hash differs, or its tensors do not fit.
        """
        p = Path(path)
        verify_file(p, sha256, f"OOD statistics {p.name}", "OOD statistics")
        t = load_file(str(p))
        means = t["means"].astype(np.float64)
        precision = t["precision"].astype(np.float64)
        d = means.shape[-1]
        if means.ndim not in (2, 3) or means.shape[0] != 7 or precision.shape != (d, d):
            raise ModelLoadError(
                f"{p.name}: means {list(means.shape)} and precision {list(precision.shape)} "
                "do not fit"
            )
        return cls(means, precision, None if threshold is None else float(threshold))


def fit_ood(
    features: np.ndarray,
    levels: np.ndarray,
    targets: np.ndarray | None = None,
    min_per_level: int = 10,
) -> tuple[OODStats, dict[str, Any]]:
    """Fit per-level (and per-class) means and a shared Ledoit-Wolf covariance.

    Parameters
    ----------
    features
        ``[N, D]`` crop features of the training crops.
    levels
        ``[N]`` vertebra index 0..6 of each crop.
    targets
        ``[N]`` 0/1 fracture label of each crop's vertebra (``None``: one class).
    min_per_level
        A level (or level and class) with fewer crops uses the mean of the level (or of
        all crops).

    Returns
    -------
    tuple
        The statistics (no threshold yet) and facts about the fit (``n_crops``,
        ``n_per_level``, ``dim``, ``shrinkage``).
    """
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.int64)
    if f.ndim != 2 or f.shape[0] != lv.shape[0] or f.shape[0] < 2:
        raise ValueError(f"need [N, D] features with N >= 2 and N levels, got {list(f.shape)}")
    cls_ = np.zeros(lv.shape, np.int64) if targets is None else (np.asarray(targets) > 0.5)
    cls_ = cls_.astype(np.int64)
    n_cls = 1 if targets is None else 2
    overall = f.mean(axis=0)
    means = np.tile(overall, (7, n_cls, 1))
    names = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
    counts: dict[str, list[int]] = {}
    for k in range(7):
        at = lv == k
        level_mean = f[at].mean(axis=0) if at.sum() >= min_per_level else overall
        counts[names[k]] = []
        for c in range(n_cls):
            sel = at & (cls_ == c)
            counts[names[k]].append(int(sel.sum()))
            means[k, c] = f[sel].mean(axis=0) if sel.sum() >= min_per_level else level_mean
    lw = LedoitWolf(assume_centered=True).fit(f - means[lv, cls_])
    info = {
        "n_crops": int(f.shape[0]),
        "classes": ["intact", "fractured"] if n_cls == 2 else ["all"],
        "n_per_level_and_class": counts,
        "dim": int(f.shape[1]),
        "shrinkage": float(lw.shrinkage_),
        "min_per_level": int(min_per_level),
    }
    return OODStats(means, np.asarray(lw.precision_, dtype=np.float64)), info


def conformal_threshold(scores: np.ndarray, rate: float) -> float:
    """Split-conformal threshold: the ``ceil((n + 1)(1 - rate))``-th smallest score.

    Parameters
    ----------
    scores
        Scores of in-distribution validation crops.
    rate
        Tolerated false-abstention rate, in (0, 1).

    Returns
    -------
    float
        The threshold (the largest score when ``n`` is too small for ``rate``).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("need at least one validation score")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must lie in (0, 1), got {rate}")
    k = math.ceil((s.size + 1) * (1.0 - rate))
    return float(s[min(k, s.size) - 1])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def logit(p: np.ndarray | float, eps: float = 1e-7) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(q) - np.log1p(-q)


def binary_nll(y: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary negative log-likelihood of ``sigmoid(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    t = np.asarray(y, dtype=np.float64)
    # log(1 + exp(-|z|)) + max(z, 0) - t z, numerically stable
    return float(np.mean(np.logaddexp(0.0, z) - t * z))


def fit_temperature(
    y: np.ndarray, logits: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature minimising :func:`binary_nll` on ``(y, logits)``.

    Parameters
    ----------
    y
        0/1 targets.
    logits
        Uncalibrated logits.
    bounds
        Search interval of the temperature.

    Returns
    -------
    float
        The fitted temperature (1.0 when there is nothing to fit: fewer than 2 samples
        or a single class).
    """
    t = np.asarray(y, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    if t.size < 2 or t.min() == t.max():
        return 1.0
    res = optimize.minimize_scalar(
        lambda lt: binary_nll(t, z, math.exp(lt)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(res.x))


@dataclass
class HeadOutput:
    """Stage-2 logits of one study after OOD abstention.

    Attributes
    ----------
    vertebra_logits
        float64 ``[7]``; NaN where not assessed (no crop, or abstained).
    patient_logit
        Head logit over the vertebrae still assessed (``None`` when none is left).
    ood_scores
        float64 ``[7]``; NaN where there is no crop or no OOD statistics.
    abstained
        Boolean ``[7]``: crops not assessed because their score is above the threshold.
    """

    vertebra_logits: np.ndarray
    patient_logit: float | None
    ood_scores: np.ndarray
    abstained: np.ndarray

    @property
    def assessed(self) -> np.ndarray:
        """Boolean ``[7]``: vertebrae with a logit."""
        return np.isfinite(self.vertebra_logits)


@torch.inference_mode()
def run_heads(
    net: FractureNet,
    feats: torch.Tensor,
    present: np.ndarray,
    ood: OODStats | None,
    device: torch.device,
) -> HeadOutput:
    """Score the crops of one study, drop those out of distribution, run the heads.

    Parameters
    ----------
    net
        A :class:`ai.cls.net.FractureNet`.
    feats
        ``[N, S, D]`` encoder features of the ``N = present.sum()`` crops.
    present
        Boolean ``[7]``: which vertebrae have a crop.
    ood
        OOD statistics, or ``None`` (nothing abstains, no score).
    device
        Where the heads run.

    Returns
    -------
    HeadOutput
        Logits of the vertebrae still assessed and the patient logit over them.
    """
    present = np.asarray(present, dtype=bool)
    scores = np.full(7, np.nan)
    abstained = np.zeros(7, dtype=bool)
    keep = present.copy()
    rows = np.ones(int(present.sum()), dtype=bool)
    if ood is not None and present.any():
        s = ood.score(crop_features(feats), np.nonzero(present)[0])
        scores[present] = s
        out = ood.abstains(s)
        abstained[present] = out
        keep = present & ~abstained
        rows = ~out
    vert = np.full(7, np.nan)
    if not keep.any():
        return HeadOutput(vert, None, scores, abstained)
    f = feats[torch.from_numpy(rows)].to(device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
    with amp:
        res = net.forward_features(f, torch.from_numpy(keep)[None].to(device))
    v = res["vertebra_logits"].float()[0].cpu().numpy().astype(np.float64)
    vert[keep] = v[keep]
    return HeadOutput(vert, float(res["patient_logits"].float()[0]), scores, abstained)


@dataclass(frozen=True)
class Calibration:
    """Temperatures applied to the logits (1.0: as trained)."""

    vertebra_temperature: float = 1.0
    patient_temperature: float = 1.0

    @classmethod
    def from_meta(cls, section: dict[str, Any] | None) -> Calibration:
        """From ``model.json``'s ``calibration`` section (``None``: identity)."""
        if not section:
            return cls()
        tv = float(section["vertebra_temperature"])
        tp = float(section["patient_temperature"])
        if not (tv > 0 and tp > 0 and math.isfinite(tv) and math.isfinite(tp)):
            raise ValueError(f"temperatures must be positive and finite, got {tv}, {tp}")
        return cls(tv, tp)

    def probabilities(
        self, out: HeadOutput, patient_mode: str
    ) -> tuple[np.ndarray, dict[str, float | None]]:
        """Calibrated vertebra probabilities and the patient probability of each mode.

        The patient temperature applies to ``patient_mode`` only (it was fitted on it);
        the other mode is reported with calibrated vertebrae but no patient temperature.
        """
        from ai.cls.model import noisy_or

        # float32 sigmoid, as the network's outputs always were: temperature 1 gives the
        # probabilities of a package without calibration bit for bit
        z = torch.from_numpy(out.vertebra_logits / self.vertebra_temperature).float()
        probs = torch.sigmoid(z).numpy().astype(np.float64)
        probs[~out.assessed] = np.nan
        if out.patient_logit is None:
            return probs, {"head": None, "noisy_or": None}
        nor = noisy_or(probs[out.assessed])
        head_t = self.patient_temperature if patient_mode == "head" else 1.0
        nor_t = self.patient_temperature if patient_mode == "noisy_or" else 1.0
        head = float(torch.sigmoid(torch.tensor(out.patient_logit / head_t, dtype=torch.float32)))
        nor_p = nor if nor_t == 1.0 else float(_sigmoid(logit(nor) / nor_t))
        return probs, {"head": head, "noisy_or": nor_p}


def study_hash(uids: Sequence[str]) -> str:
    """sha256 of the sorted study UIDs, one a line: names a set of studies compactly."""
    return hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()
