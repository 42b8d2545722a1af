"""Training and evaluation of the stage-2 classifier on cached crops.

Loss: binary cross-entropy weighted exactly like the RSNA 2022 metric
(:func:`ai.metrics.weighted_log_loss`): vertebra rows 1/2 (negative/positive), the patient
row 7/14, each study's weighted mean, averaged over the studies. Vertebrae that were not
assessed (no crop) carry no loss. Plus, weighted by ``slice_loss``, an auxiliary per-slice
BCE on the slice logits where ``train_bounding_boxes.csv`` tells which crop slices show the
fracture (every slice of a non-fractured vertebra is a negative); this dense supervision
is what makes training from scratch on a small dataset feasible.

Augmentation (training only, on the cached crops, per study): left-right flip,
reversal of the slice order (p 0.2, as the reference's random slice order), a random
shift of up to 8% of the crop, and a random contrast/brightness change of the image
channels (the mask channel is left as is). Optional mixup between studies whose assessed
vertebrae are the same.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ai import metrics
from ai.cls.crops import CropConfig
from ai.cls.data import StudyCrops
from ai.cls.model import ARCHITECTURE_CLASS, PATIENT_MODES, noisy_or
from ai.cls.net import FractureNet, build, with_memory_format
from ai.modelpkg import DEMO_LABEL, save_package
from ai.training import (
    autocast,
    grad_scaler,
    load_checkpoint,
    optimiser_step,
    plain,
    restore_training_states,
    save_checkpoint,
    set_lr,
    training_states,
    warmup_cosine_lr,
)
from ai.types import VERTEBRAE

log = logging.getLogger(__name__)

NEG_W = torch.tensor([1, 1, 1, 1, 1, 1, 1, 7], dtype=torch.float32)
POS_W = torch.tensor([2, 2, 2, 2, 2, 2, 2, 14], dtype=torch.float32)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (recorded in ``model.json``)."""

    epochs: int = 10
    batch_size: int = 4
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    folds: int = 5
    fold: int = 0
    seed: int = 0
    mixup: float = 0.0
    variant: str = "atto"
    depths: list[int] | None = None
    dims: list[int] | None = None
    lstm_hidden: int = 128
    drop_path: float = 0.05
    dropout: float = 0.1
    layer_scale: float = 1e-6
    pooling: str = "mean"
    encoder_pool: str = "mean"
    stem: str = "patch"
    slice_loss: float = 1.0
    box_loss: float = 0.0
    box_stage: int = 1
    threshold: float = 0.5
    pretrain_steps: int = 0
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-4
    head_epochs: int = 0
    head_lr: float = 1e-3
    head_batch: int = 16
    extra: dict[str, Any] = field(default_factory=dict)

    def net_params(self, in_chans: int) -> dict[str, Any]:
        """Architecture parameters for :class:`FractureNet`."""
        params: dict[str, Any] = {
            "variant": self.variant,
            "in_chans": in_chans,
            "lstm_hidden": self.lstm_hidden,
            "drop_path": self.drop_path,
            "dropout": self.dropout,
            "layer_scale": self.layer_scale,
            "pooling": self.pooling,
        }
        if self.encoder_pool != "mean":  # packages of the default keep their old params
            params["encoder_pool"] = self.encoder_pool
        if self.stem != "patch":
            params["stem"] = self.stem
        if self.depths is not None and self.dims is not None:
            params["depths"] = list(self.depths)
            params["dims"] = list(self.dims)
        return params


def weighted_bce(
    vert_logits: torch.Tensor,
    patient_logits: torch.Tensor,
    labels: torch.Tensor,
    present: torch.Tensor,
) -> torch.Tensor:
    """Competition-weighted BCE (see the module docstring).

    Parameters
    ----------
    vert_logits
        ``[B, 7]``.
    patient_logits
        ``[B]``.
    labels
        ``[B, 8]`` targets (may be fractional under mixup).
    present
        Boolean ``[B, 7]``; absent vertebrae get weight 0.
    """
    logits = torch.cat([vert_logits.float(), patient_logits.float()[:, None]], dim=1)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    w = labels * POS_W.to(labels.device) + (1 - labels) * NEG_W.to(labels.device)
    mask = torch.cat([present, present.new_ones((present.shape[0], 1))], dim=1).float()
    w = w * mask
    return ((w * bce).sum(dim=1) / w.sum(dim=1)).mean()


def slice_bce(slice_logits: torch.Tensor, slice_labels: torch.Tensor) -> torch.Tensor:
    """Auxiliary per-slice BCE over the slices with a known label (label >= 0)."""
    known = slice_labels >= 0
    if not bool(known.any()):
        return slice_logits.sum() * 0.0
    target = slice_labels.clamp(min=0.0)
    pos = float((target[known] > 0.5).sum())
    neg = float(known.sum()) - pos
    weight = torch.where(target > 0.5, max(1.0, neg / max(pos, 1.0)) ** 0.5, 1.0) * known
    bce = nn.functional.binary_cross_entropy_with_logits(
        slice_logits.float(), target, reduction="none"
    )
    return (weight * bce).sum() / weight.sum()


def fold_split(n: int, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation studies of one fold (seeded shuffle).

    ``folds == 1`` trains on everything and validates on nothing.
    """
    if folds < 1 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 1 and 0 <= fold < folds, got folds={folds} fold={fold}")
    order = np.random.default_rng(seed).permutation(n)
    if folds == 1:
        return order, order[:0]
    parts = np.array_split(order, folds)
    val = parts[fold]
    train = np.concatenate([p for i, p in enumerate(parts) if i != fold])
    return train, val


def _augment(
    x: torch.Tensor, gen: torch.Generator, n_image: int | None = None
) -> tuple[torch.Tensor, bool]:
    """Augment one study's crops ``[n, S, C, H, W]`` (float in [0, 1]).

    The first ``n_image`` channels (default: all but the last, the mask) are images and
    get an intensity change; the others (the mask, and a box map when one is appended)
    only follow the geometric changes. Returns the crops and whether the slice order was
    reversed.
    """
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    reversed_order = bool(torch.rand((), generator=gen) < 0.2)
    if reversed_order:
        x = x.flip(1)
    h = x.shape[-1]
    m = max(1, int(0.08 * h))
    dy, dx = (int(v) for v in torch.randint(-m, m + 1, (2,), generator=gen))
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    scale = 1.0 + 0.2 * (torch.rand((), generator=gen) - 0.5)
    shift = 0.1 * (torch.rand((), generator=gen) - 0.5)
    k = x.shape[2] - 1 if n_image is None else n_image
    img = (x[:, :, :k] * scale + shift).clamp(0.0, 1.0)
    return torch.cat([img, x[:, :, k:]], dim=2), reversed_order


def _batch(
    items: Sequence[StudyCrops], device: torch.device, augment: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    crops, slice_labels = [], []
    for it in items:
        x = it.crops.float() / 255.0
        flipped = False
        if augment is not None:
            x, flipped = _augment(x, augment)
        crops.append(x)
        sl_t = torch.from_numpy(_slice_targets(it))
        slice_labels.append(sl_t.flip(1) if flipped else sl_t)
    present = torch.from_numpy(np.stack([it.present for it in items]))
    labels = torch.from_numpy(np.stack([it.labels for it in items]))
    return (
        torch.cat(crops).to(device),
        present.to(device),
        labels.to(device),
        torch.cat(slice_labels).to(device),
    )


@torch.inference_mode()
def predict_cached(
    net: FractureNet,
    items: Sequence[StudyCrops],
    device: torch.device,
    batch_size: int = 4,
    features: Sequence[torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Probabilities for cached studies.

    With ``features`` (one ``[n_present, S, D]`` tensor per item, from
    :func:`encode_items`), the encoder is skipped.

    Returns
    -------
    dict
        ``vertebrae`` ``[n, 7]`` (NaN where not assessed) and ``patient_<mode>`` ``[n]`` for
        each patient mode (NaN when nothing was assessed).
    """
    net.eval()
    n = len(items)
    vert = np.full((n, 7), np.nan)
    pat = {m: np.full(n, np.nan) for m in PATIENT_MODES}
    idx = [i for i, it in enumerate(items) if it.present.any()]
    for s in range(0, len(idx), batch_size):
        chunk = idx[s : s + batch_size]
        if features is not None:
            present = torch.from_numpy(np.stack([items[i].present for i in chunk])).to(device)
            feats = torch.cat([features[i] for i in chunk]).to(device)
            with autocast(device):
                out = net.forward_features(feats, present)
        else:
            x, present, _, _ = _batch([items[i] for i in chunk], device, None)
            with autocast(device):
                out = net(x, present)
        v = torch.sigmoid(out["vertebra_logits"].float()).cpu().numpy()
        p = torch.sigmoid(out["patient_logits"].float()).cpu().numpy()
        for j, i in enumerate(chunk):
            mask = items[i].present
            vert[i, mask] = v[j, mask]
            pat["head"][i] = p[j]
            pat["noisy_or"][i] = noisy_or(v[j, mask])
    return {"vertebrae": vert, **{f"patient_{m}": a for m, a in pat.items()}}


def score(
    items: Sequence[StudyCrops],
    preds: dict[str, np.ndarray],
    patient_mode: str,
    prior: np.ndarray,
    threshold: float = 0.5,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Evaluation metrics for predictions of :func:`predict_cached`.

    Vertebrae that were not assessed are scored in the log loss with the training prior
    ``prior[v]`` (they have no probability of their own) and are left out of the AUCs,
    operating points and calibration; their count is reported.
    """
    y = np.stack([it.labels for it in items]).astype(np.float64)
    vert = preds["vertebrae"].copy()
    missing = np.isnan(vert)
    vert = np.where(missing, prior[None, :7], vert)
    pat = preds[f"patient_{patient_mode}"].copy()
    pat = np.where(np.isnan(pat), prior[7], pat)
    full = np.concatenate([vert, pat[:, None]], axis=1)
    assessed = ~missing
    yv, pv = y[:, :7][assessed], preds["vertebrae"][assessed]
    out: dict[str, Any] = {
        "n_studies": len(items),
        "n_patient_positive": int(y[:, 7].sum()),
        "n_vertebrae_assessed": int(assessed.sum()),
        "n_vertebrae_not_assessed": int(missing.sum()),
        "patient_mode": patient_mode,
        "weighted_log_loss": metrics.weighted_log_loss(y, full),
        "patient_auc": metrics.auc(y[:, 7], pat),
        "vertebra_auc_pooled": metrics.auc(yv, pv) if yv.size else None,
        "vertebra_auc": {},
        "patient_operating_point": metrics.sensitivity_specificity(y[:, 7], pat, threshold),
        "vertebra_operating_point": metrics.sensitivity_specificity(yv, pv, threshold),
        "patient_calibration": metrics.calibration_table(y[:, 7], pat, n_bins),
        "vertebra_calibration": metrics.calibration_table(yv, pv, n_bins),
    }
    for k, name in enumerate(VERTEBRAE):
        sel = assessed[:, k]
        out["vertebra_auc"][name] = metrics.auc(y[sel, k], preds["vertebrae"][sel, k])
    aucs = [a for a in out["vertebra_auc"].values() if a is not None]
    out["vertebra_auc_mean"] = float(np.mean(aucs)) if aucs else None
    return out


def _slice_index(items: Sequence[StudyCrops]) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """``(item, vertebra row, slice)`` of every slice with a known label, and the labels."""
    index: list[tuple[int, int, int]] = []
    labels: list[float] = []
    for i, it in enumerate(items):
        if it.slice_labels is None:
            continue
        sl = np.asarray(it.slice_labels)
        for v, s in zip(*np.nonzero(sl >= 0), strict=True):
            index.append((i, int(v), int(s)))
            labels.append(float(sl[v, s]))
    return index, np.asarray(labels)


@torch.inference_mode()
def _slice_auc(
    encoder: nn.Module,
    head: nn.Module,
    items: Sequence[StudyCrops],
    index: list[tuple[int, int, int]],
    labels: np.ndarray,
    device: torch.device,
) -> float:
    was_training = encoder.training
    encoder.eval()
    scores = []
    for c in range(0, len(index), 256):
        x = torch.stack([items[i].crops[v, s] for i, v, s in index[c : c + 256]])
        scores.append(head(encoder(x.float().div_(255.0).to(device))).squeeze(1).float().cpu())
    encoder.train(was_training)
    value = metrics.auc(labels, torch.cat(scores).numpy())
    if value is None:  # callers monitor only label sets with both classes
        raise ValueError("the slice AUC needs labels of both classes")
    return value


def pretrain_encoder(
    net: FractureNet,
    items: Sequence[StudyCrops],
    cfg: TrainConfig,
    device: torch.device,
    progress: Any = None,
    val_items: Sequence[StudyCrops] = (),
) -> list[dict[str, float]]:
    """Pre-train the slice encoder on single slices with balanced fracture labels.

    Study-level batches hold about one fractured slice in fifteen of one vertebra in ten,
    so the encoder gets little signal per step. This phase trains the ConvNeXt encoder
    (with a temporary linear head, discarded afterwards) on batches of ``pretrain_batch``
    single slices, half with a fracture box within one slice (``slice_labels == 1``) and
    half without (``0``), for ``pretrain_steps`` steps. Slices of unknown label (``-1``)
    are never used.

    With ``box_loss > 0`` and box maps in the cache, a second temporary head (a 1x1
    convolution on the output map of ConvNeXt stage ``box_stage``) learns where the
    fracture boxes are: a per-position BCE against the box map max-pooled to that stage's
    grid, weighted by ``box_loss``. It tells the encoder *where* to look, which a single
    label per slice does not; the head is discarded after pre-training.

    Every 500 steps and at the end, the slice AUC of the temporary head on the labelled
    slices of ``val_items`` is recorded (when they have both classes).

    Returns
    -------
    list of dict
        Loss every 50 steps (``{"step": .., "loss": ..}``, plus the box-map term
        ``"box_loss"`` when used and ``"val_slice_auc"`` where measured).
    """
    index, y_all = _slice_index(items)
    val_index, val_y = _slice_index(val_items)
    monitor = bool(val_index) and 0 < int(val_y.sum()) < len(val_y)
    pos, neg = np.nonzero(y_all > 0.5)[0], np.nonzero(y_all <= 0.5)[0]
    if cfg.pretrain_steps <= 0 or pos.size == 0 or neg.size == 0:
        log.info("slice pre-training skipped pos=%d neg=%d", pos.size, neg.size)
        return []
    encoder = net.encoder
    head = nn.Linear(encoder.out_dim, 1).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    use_boxes = cfg.box_loss > 0 and all(
        it.box_maps is not None for it in items if it.slice_labels is not None
    )
    if cfg.box_loss > 0 and not use_boxes:
        raise ValueError(
            "box_loss > 0 needs box maps for every study with slice labels; "
            "rebuild the crop cache with this version"
        )
    stage = int(cfg.box_stage)
    if not 0 <= stage < len(encoder.stages):
        raise ValueError(f"box_stage must lie in 0..{len(encoder.stages) - 1}, got {stage}")
    stride = 2 ** (stage + 2)
    box_head: nn.Module | None = None
    if use_boxes:
        box_head = nn.Conv2d(encoder.dims[stage], 1, 1).to(device)
        params += list(box_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    rng = np.random.default_rng(cfg.seed + 7)
    half = max(1, cfg.pretrain_batch // 2)
    warmup = max(1, cfg.pretrain_steps // 20)
    steps = range(cfg.pretrain_steps)
    it = progress(list(steps), desc="slice pre-training") if progress else steps
    history: list[dict[str, float]] = []
    losses: list[float] = []
    box_losses: list[float] = []
    encoder.train()
    for step in it:
        set_lr(opt, warmup_cosine_lr(step, cfg.pretrain_steps, warmup, cfg.pretrain_lr))
        chosen = np.concatenate([rng.choice(pos, half), rng.choice(neg, half)])
        x = torch.stack([items[index[k][0]].crops[index[k][1], index[k][2]] for k in chosen])
        x = x.float() / 255.0
        n_image = x.shape[1] - 1
        if box_head is not None:
            maps = [items[index[k][0]].box_maps[index[k][1], index[k][2]] for k in chosen]
            x = torch.cat([x, torch.stack(maps)[:, None].float()], dim=1)
        x, _ = _augment(x[:, None], gen, n_image=n_image)
        x = x[:, 0].to(device)
        y = torch.from_numpy(y_all[chosen].astype(np.float32)).to(device)
        feats = encoder.feature_maps(x[:, : n_image + 1])
        logits = head(encoder.pool_features(feats[-1])).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        if box_head is not None:
            target = nn.functional.max_pool2d(x[:, n_image + 1 :], stride)
            box_logits = box_head(feats[stage])
            box_term = nn.functional.binary_cross_entropy_with_logits(
                box_logits.float(), target.float()
            )
            box_losses.append(float(box_term.detach()))
            loss = loss + cfg.box_loss * box_term
        optimiser_step(loss, opt, clip_norm=2.0, params=params)
        losses.append(float(loss.detach()))
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % 50 == 0 or step + 1 == cfg.pretrain_steps:
            entry = {"step": step + 1, "loss": float(np.mean(losses[-50:]))}
            if box_losses:
                entry["box_loss"] = float(np.mean(box_losses[-50:]))
            if monitor and ((step + 1) % 500 == 0 or step + 1 == cfg.pretrain_steps):
                entry["val_slice_auc"] = _slice_auc(
                    encoder, head, val_items, val_index, val_y, device
                )
                log.info(
                    "pre-training step %d val slice AUC %.3f", step + 1, entry["val_slice_auc"]
                )
            history.append(entry)
    return history


@torch.inference_mode()
def encode_items(
    net: FractureNet,
    items: Sequence[StudyCrops],
    device: torch.device,
    *,
    flip: bool = False,
    batch_slices: int = 256,
) -> list[torch.Tensor]:
    """ConvNeXt features of every crop slice, one float32 ``[n_present, S, D]`` per item.

    ``flip`` mirrors the crops left-right first (the head phase's flip augmentation).
    """
    net.eval()
    out = []
    for it in items:
        n, s = it.crops.shape[:2]
        flat = it.crops.flatten(0, 1)
        parts = []
        for i in range(0, flat.shape[0], batch_slices):
            x = flat[i : i + batch_slices].to(device).float() / 255.0
            if flip:
                x = x.flip(-1)
            with autocast(device):
                parts.append(net.encoder(x).float().cpu())
        out.append(torch.cat(parts).view(n, s, -1) if parts else torch.zeros((0, s, 1)))
    return out


def train_heads(
    net: FractureNet,
    train_items: Sequence[StudyCrops],
    val_items: Sequence[StudyCrops],
    cfg: TrainConfig,
    device: torch.device,
    prior: np.ndarray,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Train the slice LSTM and the heads on fixed encoder features (``head_epochs``).

    The encoder (pre-trained by :func:`pretrain_encoder`) is frozen; its features of every
    training crop, as is and mirrored left-right, are computed once, so an epoch costs only
    the LSTM and the heads. Augmentation: the mirrored features (p 0.5) and reversal of the
    slice order (p 0.2). Loss as in :func:`train`. The weights with the lowest validation
    weighted log loss are kept.

    Returns
    -------
    list of dict
        Per epoch: ``head_epoch``, ``train_loss`` and the validation losses.
    """
    feats = [
        encode_items(net, train_items, device),
        encode_items(net, train_items, device, flip=True),
    ]
    val_feats = encode_items(net, val_items, device) if val_items else []
    params = [p for name, p in net.named_parameters() if not name.startswith("encoder.")]
    opt = torch.optim.AdamW(params, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    steps_per_epoch = math.ceil(len(train_items) / cfg.head_batch)
    total = steps_per_epoch * cfg.head_epochs
    warmup = max(1, steps_per_epoch)
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    epochs = range(cfg.head_epochs)
    it = progress(list(epochs), desc="head epochs") if progress else epochs
    for epoch in it:
        net.train()
        net.encoder.eval()
        order = torch.randperm(len(train_items), generator=gen).tolist()
        losses = []
        for b in range(steps_per_epoch):
            set_lr(opt, warmup_cosine_lr(epoch * steps_per_epoch + b, total, warmup, cfg.head_lr))
            chunk = order[b * cfg.head_batch : (b + 1) * cfg.head_batch]
            f_list, sl_list = [], []
            for i in chunk:
                item = train_items[i]
                flipped = bool(torch.rand((), generator=gen) < 0.5)
                f = feats[int(flipped)][i]
                sl = torch.from_numpy(_slice_targets(item))
                if torch.rand((), generator=gen) < 0.2:
                    f, sl = f.flip(1), sl.flip(1)
                f_list.append(f)
                sl_list.append(sl)
            present = torch.from_numpy(np.stack([train_items[i].present for i in chunk]))
            labels = torch.from_numpy(np.stack([train_items[i].labels for i in chunk]))
            res = net.forward_features(torch.cat(f_list).to(device), present.to(device))
            loss = weighted_bce(
                res["vertebra_logits"], res["patient_logits"], labels.to(device), present.to(device)
            )
            if cfg.slice_loss > 0:
                loss = loss + cfg.slice_loss * slice_bce(
                    res["slice_logits"], torch.cat(sl_list).to(device)
                )
            optimiser_step(loss, opt, clip_norm=2.0, params=params)
            losses.append(float(loss.detach()))
        entry: dict[str, Any] = {"head_epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if val_items:
            best = _validate(net, val_items, device, cfg.head_batch, prior, entry, best, val_feats)
        history.append(entry)
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(
                loss=f"{entry['train_loss']:.4f}", val=f"{entry.get('val_loss_head', 0):.4f}"
            )
    if best is not None:
        net.load_state_dict(best[1])
    return history


_Best = tuple[float, dict[str, torch.Tensor]] | None


def _validate(
    net: FractureNet,
    val_items: Sequence[StudyCrops],
    device: torch.device,
    batch_size: int,
    prior: np.ndarray,
    entry: dict[str, Any],
    best: _Best,
    features: Sequence[torch.Tensor] | None = None,
) -> _Best:
    """Add the validation losses of each patient mode to ``entry``; return the new best.

    The best is ``(loss, weights)`` with the lowest loss over the modes so far.
    """
    preds = predict_cached(net, val_items, device, batch_size, features=features)
    for mode in PATIENT_MODES:
        entry[f"val_loss_{mode}"] = score(val_items, preds, mode, prior)["weighted_log_loss"]
    val_loss = min(entry[f"val_loss_{m}"] for m in PATIENT_MODES)
    if best is None or val_loss < best[0]:
        return val_loss, _copy_weights(net)
    return best


def _slice_targets(item: StudyCrops) -> np.ndarray:
    """``[n_present, S]`` slice labels of an item; unknown positives where it has none."""
    n, s = item.crops.shape[:2]
    sl = item.slice_labels
    if sl is None or sl.shape != (n, s):
        sl = np.where(item.labels[:7][item.present][:, None] > 0.5, -1.0, 0.0) * np.ones((1, s))
    return np.asarray(sl, dtype=np.float32)


def _copy_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``net``'s weights (the best-so-far snapshot)."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _split_items(
    items: Sequence[StudyCrops], cfg: TrainConfig
) -> tuple[list[StudyCrops], list[StudyCrops]]:
    """The training and validation studies of fold ``cfg.fold`` (see :func:`fold_split`).

    Studies with no assessed vertebra are dropped first.

    Raises
    ------
    ValueError
        When fewer than 2 studies remain.
    """
    items = [it for it in items if it.present.any()]
    if len(items) < 2:
        raise ValueError(f"need at least 2 studies with an assessed vertebra, got {len(items)}")
    tr_idx, va_idx = fold_split(len(items), cfg.folds, cfg.fold, cfg.seed)
    return [items[i] for i in tr_idx], [items[i] for i in va_idx]


def _build_net(
    cfg: TrainConfig,
    crop_config: CropConfig,
    device: torch.device,
    init: str | Path | None,
    meta: dict[str, Any],
) -> tuple[FractureNet, dict[str, Any]]:
    """The network of ``cfg`` on ``device`` (channels-last on CUDA).

    With ``init``, the weights of that stage-2 package are loaded and its identity is
    recorded as ``training.init`` in the returned copy of ``meta``.

    Raises
    ------
    ValueError
        When the ``init`` package's architecture differs from ``cfg``'s.
    """
    net = build(cfg.net_params(crop_config.channels))
    if init is not None:
        from ai.modelpkg import load_module, read_package

        package = read_package(init)
        if package.architecture.get("params") != cfg.net_params(crop_config.channels):
            raise ValueError(
                f"--init package {init} has architecture {package.architecture.get('params')}, "
                f"not {cfg.net_params(crop_config.channels)}"
            )
        net.load_state_dict(load_module(package, build).state_dict())
        meta = {**meta, "training": {**meta.get("training", {}), "init": vars(package.identity)}}
    net = net.to(device)
    if device.type == "cuda":
        net = with_memory_format(net, torch.channels_last)
    return net, meta


@dataclass
class _Run:
    """What the steps of one :func:`train` call share: the data, the model and the progress.

    ``start_epoch``, ``history`` and ``best`` (``(loss, weights)`` of the lowest
    validation loss so far) change as the run goes on and are what a checkpoint keeps,
    with the states of ``opt`` and ``scaler`` (made for ``net`` on construction).
    """

    cfg: TrainConfig
    crop_config: CropConfig
    device: torch.device
    train_items: list[StudyCrops]
    val_items: list[StudyCrops]
    net: FractureNet
    checkpoint: Path
    progress: Any = None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: _Best = None
    opt: torch.optim.Optimizer = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        """AdamW over all the network's parameters, and the gradient scaler."""
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        self.scaler = grad_scaler(self.device)

    @property
    def arch(self) -> dict[str, Any]:
        """Architecture parameters of the network (see :meth:`TrainConfig.net_params`)."""
        return self.cfg.net_params(self.crop_config.channels)

    @property
    def prior(self) -> np.ndarray:
        """Label frequencies of the training studies, clipped to 0.01..0.99."""
        return np.stack([it.labels for it in self.train_items]).mean(axis=0).clip(0.01, 0.99)


def _resume(run: _Run) -> None:
    """Continue ``run`` from its checkpoint: weights, optimiser, scaler, history and best.

    Raises
    ------
    ValueError
        When the checkpoint was written for another architecture or crop configuration.
    """
    state = load_checkpoint(
        run.checkpoint, map_location=run.device, arch=run.arch, crop=run.crop_config.to_dict()
    )
    restore_training_states(state, run.net, run.opt, run.scaler)
    run.start_epoch = int(state["epoch"])
    run.history = list(state["history"])
    if state.get("best_net") is not None:
        run.best = (float(state["best_loss"]), state["best_net"])
    log.info("resumed at epoch %d", run.start_epoch)


def _warm_start(
    run: _Run, init: str | Path | None
) -> tuple[list[dict[str, float]], list[dict[str, Any]]]:
    """Encoder pre-training and the head phase, both only when the run starts at epoch 0.

    Pre-training (:func:`pretrain_encoder`) is skipped when the run starts from an
    ``init`` package. After the head phase (:func:`train_heads`) its best validation loss
    becomes the run's best unless a checkpoint already gave one.

    Returns
    -------
    tuple of list
        The pre-training and head-phase histories (empty when skipped).
    """
    cfg, net = run.cfg, run.net
    pretrain_history: list[dict[str, float]] = []
    if run.start_epoch == 0 and init is None and cfg.pretrain_steps > 0:
        pretrain_history = pretrain_encoder(
            net, run.train_items, cfg, run.device, run.progress, val_items=run.val_items
        )
    head_history: list[dict[str, Any]] = []
    if run.start_epoch == 0 and cfg.head_epochs > 0:
        head_history = train_heads(
            net, run.train_items, run.val_items, cfg, run.device, run.prior, run.progress
        )
        if run.val_items and run.best is None:
            loss_now = min(min(e[f"val_loss_{m}"] for m in PATIENT_MODES) for e in head_history)
            run.best = (loss_now, _copy_weights(net))
    return pretrain_history, head_history


def _train_step(run: _Run, chunk: Sequence[StudyCrops], gen: torch.Generator) -> float:
    """One optimiser step on a batch of studies (augmented, maybe mixed); returns its loss."""
    cfg = run.cfg
    x, present, labels, slice_labels = _batch(chunk, run.device, gen)
    if cfg.mixup > 0 and len(chunk) > 1 and torch.rand((), generator=gen) < cfg.mixup:
        x, labels = _mixup(x, present, labels, gen)
        slice_labels = torch.full_like(slice_labels, -1.0)  # unknown after mixing
    if run.device.type == "cuda":
        x = x.contiguous()
    with autocast(run.device):
        res = run.net(x, present)
    loss = weighted_bce(res["vertebra_logits"], res["patient_logits"], labels, present)
    if cfg.slice_loss > 0:
        loss = loss + cfg.slice_loss * slice_bce(res["slice_logits"], slice_labels)
    optimiser_step(loss, run.opt, run.scaler, clip_norm=2.0, params=run.net.parameters())
    return float(loss.detach())


def _train_epoch(run: _Run, epoch: int, gen: torch.Generator) -> float:
    """One end-to-end epoch over the training studies in a random order.

    The learning rate follows :func:`ai.training.warmup_cosine_lr` by step over all
    ``cfg.epochs``. Returns the mean training loss.
    """
    cfg = run.cfg
    steps_per_epoch = math.ceil(len(run.train_items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    run.net.train()
    order = torch.randperm(len(run.train_items), generator=gen).tolist()
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    progress = run.progress
    it = progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}") if progress else batches
    losses = []
    for b, chunk in enumerate(it):
        set_lr(run.opt, warmup_cosine_lr(epoch * steps_per_epoch + b, total, warmup, cfg.lr))
        losses.append(_train_step(run, [run.train_items[i] for i in chunk], gen))
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{np.mean(losses):.4f}")
    return float(np.mean(losses))


def _checkpoint_state(run: _Run, epoch: int) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds after ``epoch`` (1-based) epochs."""
    return {
        **training_states(run.net, run.opt, run.scaler),
        "epoch": epoch,
        "history": run.history,
        "best_net": run.best[1] if run.best else None,
        "best_loss": run.best[0] if run.best else None,
        "arch": plain(run.arch),
        "crop": plain(run.crop_config.to_dict()),
    }


def _fit(run: _Run) -> None:
    """The end-to-end epochs from ``run.start_epoch`` to ``cfg.epochs``.

    After each epoch the validation losses are added to its history entry, the best
    weights are updated, and the checkpoint is written. The augmentation generator is
    seeded from ``cfg.seed`` and the start epoch.
    """
    cfg = run.cfg
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * run.start_epoch)
    for epoch in range(run.start_epoch, cfg.epochs):
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": _train_epoch(run, epoch, gen)}
        if run.val_items:
            run.best = _validate(
                run.net, run.val_items, run.device, cfg.batch_size, run.prior, entry, run.best
            )
        run.history.append(entry)
        log.info("epoch %s", entry)
        if run.progress is not None and hasattr(run.progress, "write"):
            run.progress.write(str(entry))
        save_checkpoint(_checkpoint_state(run, epoch + 1), run.checkpoint)


def _choose_patient_mode(
    net: FractureNet, val_items: Sequence[StudyCrops], cfg: TrainConfig, prior: np.ndarray
) -> tuple[str, dict[str, Any]]:
    """The patient mode with the lower validation weighted log loss, and the metrics.

    Returns
    -------
    tuple
        The mode (``"head"`` without validation studies) and the ``metrics`` section of
        ``model.json`` (empty without validation studies).
    """
    if not val_items:
        return "head", {}
    preds = predict_cached(net, val_items, torch.device("cpu"), cfg.batch_size)
    comparison = {}
    for mode in PATIENT_MODES:
        comparison[mode] = score(val_items, preds, mode, prior)["weighted_log_loss"]
    patient_mode = min(comparison, key=lambda m: comparison[m])
    return patient_mode, {
        "validation": score(val_items, preds, patient_mode, prior, cfg.threshold),
        "patient_mode_comparison": {
            "weighted_log_loss": comparison,
            "chosen": patient_mode,
            "rule": "lower weighted log loss on the validation fold",
        },
    }


def _training_record(
    run: _Run,
    pretrain_history: list[dict[str, float]],
    head_history: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """The hyper-parameters and histories of the run, for ``model.json``'s ``training``."""
    cfg = run.cfg
    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "folds": cfg.folds,
        "fold": cfg.fold,
        "seed": cfg.seed,
        "mixup": cfg.mixup,
        "slice_loss": cfg.slice_loss,
        "box_loss": cfg.box_loss,
        "box_stage": cfg.box_stage,
        "pretrain_steps": cfg.pretrain_steps,
        "pretrain_batch": cfg.pretrain_batch,
        "pretrain_lr": cfg.pretrain_lr,
        "pretrain_history": pretrain_history,
        "head_epochs": cfg.head_epochs,
        "head_lr": cfg.head_lr,
        "head_batch": cfg.head_batch,
        "head_history": head_history,
        "n_train_studies": len(run.train_items),
        "n_validation_studies": len(run.val_items),
        "history": run.history,
        "seconds": round(seconds, 3),
        "device": str(run.device),
        "loss": "RSNA 2022 competition-weighted BCE (per-study weighted mean)",
        **cfg.extra,
    }


def _package_meta(
    meta: dict[str, Any],
    run: _Run,
    patient_mode: str,
    result_metrics: dict[str, Any],
    training: dict[str, Any],
) -> dict[str, Any]:
    """The ``model.json`` content: ``meta`` with the task, model, input and training.

    ``training`` (from :func:`_training_record`) extends ``meta``'s own ``training``
    section; a demo package gets the demo description unless ``meta`` has one.
    """
    full_meta = dict(meta)
    full_meta.update(
        {
            "task": "cls",
            "architecture": {"class": ARCHITECTURE_CLASS, "params": run.arch},
            "input": {
                "crop": run.crop_config.to_dict(),
                "layout": "[N_assessed, n_slices, channels, size, size]; channels = HU window "
                "of slices i-context..i+context, then the vertebra mask",
            },
            "labels": [*VERTEBRAE, "patient_overall"],
            "inference": {
                "patient_mode": patient_mode,
                "threshold": run.cfg.threshold,
                "prior": [float(p) for p in run.prior],
            },
            "metrics": result_metrics,
        }
    )
    full_meta["training"] = {**full_meta.get("training", {}), **training}
    if full_meta.get("demo"):
        full_meta.setdefault("description", DEMO_LABEL)
    return full_meta


def train(
    items: Sequence[StudyCrops],
    crop_config: CropConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    meta: dict[str, Any],
    resume: bool = False,
    init: str | Path | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Train one fold and write a model package.

    The steps: split the studies (:func:`_split_items`), build the network
    (:func:`_build_net`), resume from the checkpoint, pre-train the encoder and train the
    heads (:func:`_warm_start`), the end-to-end epochs (:func:`_fit`), then the best
    weights, the patient mode (:func:`_choose_patient_mode`) and the package.

    Parameters
    ----------
    items
        Cached crops of all studies (studies with no assessed vertebra are dropped).
    crop_config
        Crop parameters the items were cut with (recorded in the package).
    cfg
        Hyper-parameters.
    out_dir
        Package folder; ``checkpoint.pt`` is kept next to it for ``resume``.
    device
        Training device (AMP on CUDA).
    meta
        Extra metadata merged into ``model.json`` (name, version, training data, command...).
    resume
        Continue from ``<out_dir>/checkpoint.pt`` when it exists.
    init
        Start from the weights of this stage-2 package (fine-tuning, e.g. on stage-1 crops
        after pre-training on ground-truth crops); its architecture must match ``cfg``.
    progress
        ``tqdm``-like callable wrapping the batch iterator, or ``None``.

    Returns
    -------
    dict
        The written ``model.json`` content.
    """
    t_start = time.perf_counter()  # the whole run: pre-training, head and study epochs
    torch.manual_seed(cfg.seed)
    train_items, val_items = _split_items(items, cfg)
    net, meta = _build_net(cfg, crop_config, device, init, meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    run = _Run(cfg, crop_config, device, train_items, val_items, net, checkpoint, progress)
    if resume and run.checkpoint.is_file():
        _resume(run)
    pretrain_history, head_history = _warm_start(run, init)
    _fit(run)
    seconds = time.perf_counter() - t_start
    if run.best is not None:
        net.load_state_dict(run.best[1])
    net = with_memory_format(net, torch.contiguous_format).cpu()
    patient_mode, result_metrics = _choose_patient_mode(net, val_items, cfg, run.prior)
    training = _training_record(run, pretrain_history, head_history, seconds)
    full_meta = _package_meta(meta, run, patient_mode, result_metrics, training)
    save_package(out, net, full_meta, half=True)
    return full_meta


def _mixup(
    x: torch.Tensor, present: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix studies pairwise when their assessed vertebrae coincide (others unchanged)."""
    b = present.shape[0]
    perm = torch.randperm(b, generator=gen)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    counts = present.sum(dim=1).tolist()
    starts = np.concatenate([[0], np.cumsum(counts)])
    x_new, y_new = x.clone(), labels.clone()
    for i in range(b):
        j = int(perm[i])
        if j == i or not torch.equal(present[i], present[j]):
            continue
        a0, a1 = int(starts[i]), int(starts[i + 1])
        b0, b1 = int(starts[j]), int(starts[j + 1])
        x_new[a0:a1] = lam * x[a0:a1] + (1 - lam) * x[b0:b1]
        y_new[i] = lam * labels[i] + (1 - lam) * labels[j]
    return x_new, y_new
