"""Train and evaluate the stage-1 network on the RSNA 2022 dataset layout.

Studies are read through :class:`ai.rsna.RSNADataset` (only those with a
segmentation are used), preprocessed once with the exact inference preprocessing
(:func:`ai.seg.preprocess.prepare_input`) and cached as ``.npz`` files keyed by the
input spec. Training uses a k-fold split (fold ``fold`` is validation), random
affine / flip / intensity augmentation, BCE + soft Dice on the 7 sigmoid outputs,
AdamW with a one-cycle schedule, mixed precision on CUDA, a checkpoint after every
epoch (``--resume`` continues from it), and writes a model package.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from ai import plausibility
from ai.intended_use import from_package
from ai.modelpkg import (
    DEMO_LABEL,
    load_module,
    read_package,
    resolve_package,
    save_package,
    select_device,
)
from ai.seg.augment import DomainRandomisation, domain_randomise
from ai.seg.model import (
    ARCH_CLASS,
    DEFAULT_PACKAGE,
    N_LABELS,
    PostSpec,
    SegModel,
    build_network,
    default_arch_params,
)
from ai.seg.preprocess import (
    InputSpec,
    canonical_view,
    prepare_input,
    prepare_labels,
    roi_from_mask,
)
from ai.training import (
    autocast,
    grad_scaler,
    load_checkpoint,
    one_cycle_lr,
    optimiser_step,
    plain,
    restore_training_states,
    save_checkpoint,
    set_lr,
    training_states,
)
from ai.types import VERTEBRAE

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in ``model.json``)."""

    data: Path
    out: Path
    size: tuple[int, int, int] = (64, 64, 64)
    backbone: str = "efficientnet-b0"
    decoder_channels: tuple[int, ...] = (64, 32, 16, 8, 4)
    normalization: str = "bone_window"
    two_pass: bool = True
    epochs: int = 40
    folds: int = 5
    fold: int = 0
    seed: int = 0
    batch_size: int = 2
    lr: float = 2e-3
    pos_weight: float = 1.0
    device: str = "auto"
    resume: bool = False
    init: Path | str | None = None
    post: PostSpec = field(default_factory=PostSpec)
    cache_dir: Path | None = None
    work_dir: Path | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    name: str = DEFAULT_PACKAGE
    version: str = "0.1.0"
    demo: bool | None = None
    half: bool = True
    command: str = ""
    progress: bool = True
    domain_randomisation: DomainRandomisation | None = None
    """On-the-fly randomisation of contrast, bias, resolution, gamma and noise."""
    extra: dict[str, Any] = field(default_factory=dict)

    def input_spec(self) -> InputSpec:
        """The preprocessing this run trains for."""
        return InputSpec(size=self.size, normalization=self.normalization, two_pass=self.two_pass)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def split_folds(uids: list[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic k-fold split: returns ``(train, validation)`` uids.

    ``folds <= 1`` trains on everything with no validation set.
    """
    if folds <= 1:
        return list(uids), []
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    order = sorted(uids)
    random.Random(seed).shuffle(order)
    val = [u for i, u in enumerate(order) if i % folds == fold]
    train = [u for i, u in enumerate(order) if i % folds != fold]
    if not train:
        raise ValueError(f"{len(uids)} studies are too few for {folds} folds")
    return train, val


def _spec_key(spec: InputSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:12]


CROPS_PER_STUDY = 2
"""Spine crops cached per study besides the full view (two-pass models)."""


def cache_study(dataset: Any, uid: str, spec: InputSpec, cache_dir: Path) -> Path:
    """Preprocess one study to the working grid and cache it.

    The ``.npz`` holds ``images`` (float16, ``(n, *size)``) and ``targets`` (uint8,
    ``(n, 7, *size)``, soft channels scaled to 0..255). Sample 0 is the full view (pass 1);
    with ``spec.two_pass``, samples 1.. are crops around the true C1..C7 with random
    margins of 4..25 mm per side (pass 2), drawn from a seed derived from the uid.
    """
    key = hashlib.sha1(uid.encode()).hexdigest()[:16]
    path = cache_dir / _spec_key(spec) / f"{key}.npz"
    if path.is_file():
        return path
    study = dataset.load(uid)
    vol = study.volume
    if study.segmentation is None:
        raise ValueError(f"study {uid} has no segmentation")
    seg = np.where(study.segmentation <= N_LABELS, study.segmentation, 0).astype(np.uint8)
    x, canon, roi = prepare_input(vol.hu, vol.affine, spec)
    images = [x[0, 0]]
    targets = [prepare_labels(seg, vol.affine, spec, roi)]
    if spec.two_pass:
        view = canonical_view(seg, canon)
        rng = np.random.default_rng(int(key, 16) % (2**32))
        full = (0, view.shape[0], 0, view.shape[1], 0, view.shape[2])
        for _ in range(CROPS_PER_STUDY):
            margins = tuple(float(m) for m in rng.uniform(4.0, 25.0, size=6))
            crop = roi_from_mask(view > 0, full, view.shape, canon.spacing, margins)
            if crop is None:
                break
            xc, _, _ = prepare_input(vol.hu, vol.affine, spec, roi=crop)
            images.append(xc[0, 0])
            targets.append(prepare_labels(seg, vol.affine, spec, crop))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        images=torch.stack(images).numpy().astype(np.float16),
        targets=np.rint(torch.stack(targets).numpy() * 255).astype(np.uint8),
    )
    tmp.replace(path)
    return path


def _load_cached(paths: list[Path], variants: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack cached samples: images float16 ``(N, 1, ...)``, targets uint8 ``(N, 7, ...)``.

    ``variants``: ``"all"``, ``"full"`` (sample 0 only) or ``"crops"`` (samples 1.., or
    sample 0 where a study has no crop).
    """
    images, targets = [], []
    for p in paths:
        with np.load(p) as z:
            imgs, tgts = z["images"], z["targets"]
        if variants == "full":
            sel = [0]
        elif variants == "crops":
            sel = list(range(1, len(imgs))) or [0]
        else:
            sel = list(range(len(imgs)))
        for i in sel:
            images.append(torch.from_numpy(imgs[i])[None])
            targets.append(torch.from_numpy(tgts[i]))
    return torch.stack(images), torch.stack(targets)


def augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine (rotation, scale, shift), left-right flip and intensity changes.

    ``x`` is ``(B, 1, d, h, w)``, ``y`` is ``(B, 7, d, h, w)``. Cranio-caudal order is
    never flipped (C1 must stay above C7).
    """
    b = x.shape[0]

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    theta = torch.zeros(b, 3, 4)
    # affine_grid coordinates are (x=w, y=h, z=d); rotate mostly in the axial (w, h) plane.
    a_ax, a_1, a_2 = u(-0.2, 0.2), u(-0.08, 0.08), u(-0.08, 0.08)
    scale = u(0.88, 1.12)
    for n in range(b):
        ca, sa = math.cos(a_ax[n]), math.sin(a_ax[n])
        rz = torch.tensor([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1.0]])
        c1, s1 = math.cos(a_1[n]), math.sin(a_1[n])
        rx = torch.tensor([[1, 0, 0], [0, c1, -s1], [0, s1, c1]])
        c2, s2 = math.cos(a_2[n]), math.sin(a_2[n])
        ry = torch.tensor([[c2, 0, s2], [0, 1, 0], [-s2, 0, c2]])
        theta[n, :, :3] = (rz @ rx @ ry) * scale[n]
        if torch.rand(1, generator=gen).item() < 0.5:
            theta[n, 0, :3] *= -1  # left-right flip
    theta[:, :, 3] = torch.stack([u(-0.08, 0.08), u(-0.08, 0.08), u(-0.08, 0.08)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x * u(0.9, 1.1).view(b, 1, 1, 1, 1) + u(-0.05, 0.05).view(b, 1, 1, 1, 1)
    x = x + 0.02 * torch.randn(x.shape, generator=gen)
    return x, y


def dice_per_label(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of each label 1..7 between two label maps; ``nan`` where both are empty."""
    out: dict[str, float] = {}
    for i, name in enumerate(VERTEBRAE, start=1):
        p, t = pred == i, truth == i
        denom = int(p.sum()) + int(t.sum())
        out[name] = float("nan") if denom == 0 else 2.0 * float((p & t).sum()) / denom
    return out


def _val_dice(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> dict[str, float]:
    net.eval()
    scores: dict[str, list[float]] = {n: [] for n in VERTEBRAE}
    with torch.inference_mode():
        for n in range(x.shape[0]):
            logits = net(x[n : n + 1].float().to(device))[0].float().cpu()
            probs = torch.sigmoid(logits)
            best, arg = probs.max(dim=0)
            pred = torch.where(best > 0.5, arg + 1, 0).numpy()
            soft = y[n].float() / 255.0
            truth = torch.where(soft.amax(dim=0) > 0.5, soft.argmax(dim=0) + 1, 0).numpy()
            for k, v in dice_per_label(pred, truth).items():
                if not math.isnan(v):
                    scores[k].append(v)
    net.train()
    per = {k: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}
    valid = [v for v in per.values() if not math.isnan(v)]
    per["mean"] = float(np.mean(valid)) if valid else float("nan")
    return per


def _looks_synthetic(root: Path) -> bool:
    markers = [p for p in root.iterdir() if "synth" in p.name.lower()]
    return bool(markers)


def _init_weights(
    net: torch.nn.Module, init: Path | str, arch: dict[str, Any], spec: InputSpec
) -> dict[str, Any]:
    """Load a verified stage-1 package's weights into ``net`` (fine-tuning start point).

    Raises
    ------
    ModelLoadError
        When the package fails verification.
    ValueError
        When its architecture parameters or input spec differ from this run's: the
        weights would not mean the same thing.
    """
    pkg = read_package(resolve_package(init))
    if pkg.meta.get("task") != "seg":
        raise ValueError(f"--init {pkg.path} is a {pkg.meta.get('task')!r} model, not 'seg'")
    theirs = pkg.architecture.get("params", {})
    if plain(theirs) != plain(arch):
        raise ValueError(
            f"--init {pkg.path} has architecture parameters {theirs}, this run needs {arch}"
        )
    if InputSpec.from_json(pkg.meta["input"]).to_json() != spec.to_json():
        raise ValueError(
            f"--init {pkg.path} was trained for input {pkg.meta['input']}, "
            f"this run uses {spec.to_json()}"
        )
    src = load_module(pkg, build_network, "cpu")
    net.load_state_dict(src.state_dict())
    ident = pkg.identity
    logger.info("initialised from package=%s version=%s", ident.name, ident.version)
    return {
        "package": str(pkg.path),
        "name": ident.name,
        "version": ident.version,
        "sha256": ident.sha256,
    }


@dataclass
class _Fold:
    """The segmented studies of a dataset and the fold's training and validation uids."""

    uids: list[str]
    train_uids: list[str]
    val_uids: list[str]


def _split_studies(cfg: TrainConfig) -> tuple[Any, _Fold]:
    """The dataset at ``cfg.data`` and the split of its segmented studies.

    Raises
    ------
    ValueError
        When fewer than 2 studies have a segmentation, or the fold is out of range.
    """
    from ai.rsna import RSNADataset

    dataset = RSNADataset(cfg.data)
    uids = [u for u in dataset.study_uids if dataset.has_segmentation(u)]
    if len(uids) < 2:
        raise ValueError(f"{cfg.data} holds {len(uids)} segmented studies; at least 2 are needed")
    train_uids, val_uids = split_folds(uids, cfg.folds, cfg.fold, cfg.seed)
    return dataset, _Fold(uids, train_uids, val_uids)


@dataclass
class _Samples:
    """The cached training samples and, with a validation fold, the validation crops."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None


def _cache_fold(cfg: TrainConfig, dataset: Any, fold: _Fold, spec: InputSpec) -> _Samples:
    """Preprocess every study of ``fold`` (:func:`cache_study`) and load the samples.

    The cache is ``cfg.cache_dir``, by default ``.seg-cache`` beside the package folder.
    Training uses every cached sample of its studies, validation the spine crops only.
    """
    from tqdm import tqdm

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).parent / ".seg-cache"
    logger.info("caching studies n=%d cache=%s", len(fold.uids), cache_dir)
    cached = {
        u: cache_study(dataset, u, spec, cache_dir)
        for u in tqdm(fold.uids, desc="cache", disable=not cfg.progress)
    }
    x_train, y_train = _load_cached([cached[u] for u in fold.train_uids])
    x_val, y_val = (
        _load_cached([cached[u] for u in fold.val_uids], "crops") if fold.val_uids else (None, None)
    )
    return _Samples(x_train, y_train, x_val, y_val)


_Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _loss_fn(cfg: TrainConfig, device: torch.device) -> _Loss:
    """BCE (``cfg.pos_weight`` on the positives) plus soft Dice of logits against targets."""
    from monai.losses import DiceLoss

    dice_loss = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)
    bce = torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.full((N_LABELS, 1, 1, 1), float(cfg.pos_weight), device=device)
    )

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce(logits.float(), target) + dice_loss(logits.float(), target)

    return loss


def _no_best() -> dict[str, Any]:
    """The best epoch before any: no weights, a Dice every validation beats."""
    return {"dice": -1.0, "state": None, "epoch": -1}


@dataclass
class _SegRun:
    """What the steps of one :func:`train` call share: the model, optimiser and progress.

    ``epoch0``, ``step``, ``history``, ``best`` (validation Dice, weights, epoch and Dice
    per label of the best epoch so far), ``gen`` and the global torch RNG are what a
    checkpoint keeps.
    """

    cfg: TrainConfig
    device: torch.device
    spec: InputSpec
    arch: dict[str, Any]
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: _Loss
    gen: torch.Generator
    checkpoint: Path
    t_start: float
    steps_per_epoch: int
    total_steps: int
    epoch0: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=_no_best)


def _start_run(
    cfg: TrainConfig,
    device: torch.device,
    spec: InputSpec,
    arch: dict[str, Any],
    net: torch.nn.Module,
    n_train: int,
    work_dir: Path,
    t_start: float,
) -> _SegRun:
    """AdamW, the gradient scaler, the loss and the augmentation generator of a new run.

    The run lasts ``cfg.epochs`` epochs of full batches over ``n_train`` samples, at most
    ``cfg.max_steps`` steps; its checkpoint is ``work_dir / CHECKPOINT``.
    """
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    return _SegRun(
        cfg=cfg,
        device=device,
        spec=spec,
        arch=arch,
        net=net,
        opt=opt,
        scaler=grad_scaler(device),
        loss_fn=_loss_fn(cfg, device),
        gen=torch.Generator().manual_seed(cfg.seed),
        checkpoint=work_dir / CHECKPOINT,
        t_start=t_start,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def _resume(run: _SegRun) -> None:
    """Continue ``run`` from its checkpoint, random number generators included.

    Raises
    ------
    ValueError
        When the checkpoint was written for another architecture or input spec.
    """
    ckpt = load_checkpoint(run.checkpoint, arch=run.arch, spec=run.spec.to_json())
    restore_training_states(
        ckpt, run.net, run.opt, run.scaler, net_key="model", opt_key="optimizer"
    )
    run.gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    run.epoch0, run.step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
    run.history = list(ckpt["history"])
    run.best = {
        "dice": float(ckpt["best_dice"]),
        "state": ckpt["best_state"],
        "epoch": ckpt["best_epoch"],
    }
    logger.info("resumed from %s at epoch %d step %d", run.checkpoint, run.epoch0, run.step)


def _out_of_budget(run: _SegRun) -> bool:
    """Whether the run has reached ``cfg.max_steps`` or ``cfg.max_minutes``."""
    cfg = run.cfg
    out_of_time = (
        cfg.max_minutes is not None and (time.monotonic() - run.t_start) > 60 * cfg.max_minutes
    )
    return (cfg.max_steps is not None and run.step >= cfg.max_steps) or out_of_time


def _train_step(run: _SegRun, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimiser step on cached samples (augmented here); returns the batch loss.

    The learning rate is :func:`ai.training.one_cycle_lr` at the larger of the step
    fraction and, with ``cfg.max_minutes``, the wall-time fraction.
    """
    cfg = run.cfg
    xb, yb = augment(x.float(), y.float() / 255.0, run.gen)
    if cfg.domain_randomisation is not None:
        xb = domain_randomise(xb, yb, run.gen, cfg.domain_randomisation)
    xb, yb = xb.to(run.device), yb.to(run.device)
    with autocast(run.device):
        logits = run.net(xb)
    loss = run.loss_fn(logits, yb)
    frac = run.step / max(run.total_steps, 1)
    if cfg.max_minutes:
        frac = max(frac, (time.monotonic() - run.t_start) / (60 * cfg.max_minutes))
    set_lr(run.opt, one_cycle_lr(frac, cfg.lr))
    optimiser_step(loss, run.opt, run.scaler)
    run.step += 1
    return float(loss.detach())


def _train_epoch(run: _SegRun, epoch: int, data: _Samples) -> tuple[list[float], bool]:
    """One epoch of full batches (wrapping around) over the shuffled training samples.

    Returns
    -------
    tuple
        The batch losses, and whether the run stopped early (:func:`_out_of_budget`).
    """
    from tqdm import tqdm

    cfg, n_train = run.cfg, data.x_train.shape[0]
    perm = torch.randperm(n_train, generator=run.gen)
    bar = tqdm(
        range(run.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not cfg.progress,
    )
    losses: list[float] = []
    for b in bar:
        # Always full batches (wrapping around), so batch norm never sees a batch of 1.
        idx = perm[(b * cfg.batch_size + torch.arange(cfg.batch_size)) % n_train]
        losses.append(_train_step(run, data.x_train[idx], data.y_train[idx]))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", val_dice=f"{run.best['dice']:.3f}")
        if _out_of_budget(run):
            return losses, True
    return losses, False


def _end_epoch(run: _SegRun, epoch: int, losses: list[float], data: _Samples) -> None:
    """Validate, record the epoch in the history, keep the best weights, log.

    Without a validation fold every epoch counts as the best (the last one is kept).
    """
    from tqdm import tqdm

    net, cfg = run.net, run.cfg
    val = (
        _val_dice(net, data.x_val, data.y_val, run.device)
        if data.x_val is not None and data.y_val is not None
        else {}
    )
    entry = {
        "epoch": epoch + 1,
        "step": run.step,
        "loss": float(np.mean(losses)) if losses else None,
        "val_dice": val.get("mean"),
        "seconds": round(time.monotonic() - run.t_start, 1),
    }
    run.history.append(entry)
    logger.info(
        "epoch %d loss=%.4f val_dice=%s", epoch + 1, entry["loss"] or float("nan"), val.get("mean")
    )
    if cfg.progress:
        tqdm.write(
            f"epoch {epoch + 1}: loss {entry['loss']:.4f} "
            f"val dice {val.get('mean', float('nan')):.4f}"
        )
    score = val.get("mean", -1.0) if val else -1.0
    if not val or (not math.isnan(score) and score >= run.best["dice"]):
        run.best = {
            "dice": score,
            "state": copy.deepcopy(net.state_dict()),
            "epoch": epoch + 1,
            "per_label": val,
        }


def _checkpoint_state(run: _SegRun, epoch: int) -> dict[str, Any]:
    """What the checkpoint holds after ``epoch`` (0-based)."""
    return {
        **training_states(run.net, run.opt, run.scaler, net_key="model", opt_key="optimizer"),
        "generator": run.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "step": run.step,
        "history": run.history,
        "best_dice": run.best["dice"],
        "best_state": run.best["state"],
        "best_epoch": run.best["epoch"],
        "arch": plain(run.arch),
        "spec": run.spec.to_json(),
    }


def _fit(run: _SegRun, data: _Samples) -> None:
    """The epochs from ``run.epoch0``, each ending with a checkpoint; stops early at the
    step or time budget."""
    run.net.train()
    for epoch in range(run.epoch0, run.cfg.epochs):
        losses, stop = _train_epoch(run, epoch, data)
        _end_epoch(run, epoch, losses, data)
        save_checkpoint(_checkpoint_state(run, epoch), run.checkpoint)
        if stop:
            break


def _package_meta(
    run: _SegRun, fold: _Fold, n_train: int, init_from: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``model.json`` content of the trained model (a demo one when the data looks
    synthetic, unless ``cfg.demo`` says)."""
    cfg, best = run.cfg, run.best
    demo = cfg.demo if cfg.demo is not None else _looks_synthetic(Path(cfg.data))
    return {
        "name": cfg.name,
        "version": cfg.version,
        "task": "seg",
        "description": (DEMO_LABEL if demo else "C1-C7 segmentation")
        + f"; FlexibleUNet {cfg.backbone} at {'x'.join(map(str, cfg.size))}",
        "demo": demo,
        "label": DEMO_LABEL if demo else None,
        "architecture": {"class": ARCH_CLASS, "params": run.arch},
        "input": run.spec.to_json(),
        "postprocess": cfg.post.to_json(),
        "labels": {str(i): name for i, name in enumerate(VERTEBRAE, start=1)},
        "outputs": f"{N_LABELS} sigmoid channels, channel n-1 = label n",
        "training": _training_record(run, fold, n_train, init_from, demo),
        "metrics": {
            "val_dice_working_grid": best.get("per_label", {}),
            "best_epoch": best["epoch"],
        },
    }


def _training_record(
    run: _SegRun, fold: _Fold, n_train: int, init_from: dict[str, Any] | None, demo: bool
) -> dict[str, Any]:
    """The data, hyper-parameters and history of the run, for ``model.json``'s ``training``."""
    cfg = run.cfg
    return {
        "data": str(cfg.data),
        "data_description": (
            "synthetic RSNA-layout studies from ai.synthetic" if demo else "RSNA layout"
        ),
        "n_studies": len(fold.uids),
        "train_studies": len(fold.train_uids),
        "train_samples": n_train,
        "val_studies": len(fold.val_uids),
        "folds": cfg.folds,
        "fold": cfg.fold,
        "epochs_run": len(run.history),
        "steps": run.step,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "lr_schedule": "5% linear warm-up, cosine decay (by step or wall-time fraction)",
        "loss": "BCEWithLogits + soft Dice (MONAI DiceLoss, sigmoid)",
        "bce_pos_weight": cfg.pos_weight,
        "augmentation": "random rotation/scale/shift, left-right flip, "
        "intensity scale/shift, noise"
        + (
            "; domain randomisation (ai.seg.augment): per-tissue contrast, bias field, "
            "resolution, blur, gamma, white/correlated noise"
            if cfg.domain_randomisation is not None
            else ""
        ),
        "domain_randomisation": (
            cfg.domain_randomisation.to_json() if cfg.domain_randomisation else None
        ),
        "seed": cfg.seed,
        "device": str(run.device),
        "init": init_from,
        "command": cfg.command,
        "seconds": round(time.monotonic() - run.t_start, 1),
        "history": run.history,
        **cfg.extra,
    }


def train(cfg: TrainConfig) -> Path:
    """Run a training and write the model package to ``cfg.out``.

    The steps: seed everything, split the segmented studies (:func:`_split_studies`),
    build the network (from ``cfg.init`` when given), cache and load the samples
    (:func:`_cache_fold`), resume from the checkpoint in ``cfg.work_dir``, the epochs
    (:func:`_fit`), then the package with the best epoch's weights.

    Parameters
    ----------
    cfg
        The run's settings.

    Returns
    -------
    pathlib.Path
        The package folder.
    """
    t_start = time.monotonic()
    _seed_all(cfg.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    device = select_device(cfg.device)
    spec = cfg.input_spec()
    dataset, fold = _split_studies(cfg)
    arch = default_arch_params(cfg.backbone, cfg.decoder_channels)
    net = build_network(arch).to(device)
    # before the (long) caching, so that a mismatched --init fails at once
    init_from = _init_weights(net, cfg.init, arch, spec) if cfg.init is not None else None
    work_dir = Path(cfg.work_dir) if cfg.work_dir else Path(cfg.out).parent / ".seg-work"
    work_dir.mkdir(parents=True, exist_ok=True)
    data = _cache_fold(cfg, dataset, fold, spec)
    n_train = data.x_train.shape[0]
    run = _start_run(cfg, device, spec, arch, net, n_train, work_dir, t_start)
    if cfg.resume and run.checkpoint.is_file():
        _resume(run)
    _fit(run, data)
    if run.best["state"] is not None:
        net.load_state_dict(run.best["state"])
    out = save_package(cfg.out, net, _package_meta(run, fold, n_train, init_from), half=cfg.half)
    logger.info("package written path=%s", out)
    return out


def evaluate(
    data: Path,
    model: str | Path = DEFAULT_PACKAGE,
    *,
    registry: str | Path | None = None,
    device: str = "auto",
    uids: list[str] | None = None,
    progress: bool = True,
    post: PostSpec | None = None,
    gate: bool = True,
) -> dict[str, Any]:
    """Per-vertebra Dice of a stage-1 model on the original grid of every segmented study.

    ``post`` replaces the package's post-processing for this evaluation (to compare
    settings on a validation set); the report records which one was used.

    With ``gate`` (the default, as the node runs), each study first meets stage 1's
    intended use and its label map the plausibility checks (:mod:`ai.plausibility`):
    a refused study delivers no labels, a refused vertebra is removed, and both count
    against Dice. The report's ``gate`` section counts what was refused.

    Returns
    -------
    dict
        ``{"model": {...}, "n_studies": n, "dice": {"C1": .., ..., "mean": ..}, "studies": [...]}``;
        a vertebra's Dice is averaged over the studies where the truth or the prediction has it.
    """
    from tqdm import tqdm

    from ai.rsna import RSNADataset

    torch.set_num_threads(min(2, torch.get_num_threads()))
    seg = SegModel.load(model, registry=registry, device=device)
    if post is not None:
        seg.post = post
    dataset = RSNADataset(data)
    chosen = uids or [u for u in dataset.study_uids if dataset.has_segmentation(u)]
    per: dict[str, list[float]] = {n: [] for n in VERTEBRAE}
    studies = []
    use = from_package(seg.package.meta, "stage1") if gate else None
    counts = {"studies_refused": 0, "vertebrae_in_truth": 0, "vertebrae_refused": 0}
    reasons: dict[str, int] = {}
    for uid in tqdm(chosen, desc="evaluate", disable=not progress):
        study = dataset.load(uid)
        if study.segmentation is None:
            raise ValueError(f"study {uid} has no segmentation to evaluate against")
        truth = np.where(study.segmentation <= N_LABELS, study.segmentation, 0)
        in_truth = set(plausibility.measure(study.volume, truth))
        counts["vertebrae_in_truth"] += len(in_truth)
        refused_here: list[str] = []
        findings = use.check(study.volume) if use is not None else []
        if findings:
            labels = np.zeros(truth.shape, np.uint8)
            seconds = 0.0
            refused_here = sorted(in_truth)
            reasons[findings[0].check] = reasons.get(findings[0].check, 0) + 1
            counts["studies_refused"] += 1
        else:
            out = seg.predict(study.volume)
            labels, seconds = np.asarray(out.label_map), out.seconds
            if gate:
                verdict = plausibility.check(study.volume, labels)
                found = set(verdict.stats)
                if verdict.study is not None or not found or verdict.rejected.keys() == found:
                    labels = np.zeros_like(labels)
                    counts["studies_refused"] += 1
                    refused_here = sorted(in_truth)
                    why = verdict.study or next(iter(verdict.rejected.values()), None)
                    key = why.check if why is not None else "nothing_found"
                    reasons[key] = reasons.get(key, 0) + 1
                else:
                    labels = labels.copy()
                    for name, finding in verdict.rejected.items():
                        labels[labels == VERTEBRAE.index(name) + 1] = 0
                        reasons[finding.check] = reasons.get(finding.check, 0) + 1
                        if name in in_truth:
                            refused_here.append(name)
        counts["vertebrae_refused"] += len(refused_here)
        d = dice_per_label(labels, truth)
        for k, v in d.items():
            if not math.isnan(v):
                per[k].append(v)
        valid = [v for v in d.values() if not math.isnan(v)]
        studies.append(
            {
                "uid": uid,
                "dice": d,
                "mean": float(np.mean(valid)) if valid else None,
                "seconds": round(seconds, 2),
                "refused": refused_here,
            }
        )
    dice = {k: (float(np.mean(v)) if v else None) for k, v in per.items()}
    valid = [v for v in dice.values() if v is not None]
    dice["mean"] = float(np.mean(valid)) if valid else None
    ident = seg.identity
    return {
        "model": {"name": ident.name, "version": ident.version, "sha256": ident.sha256},
        "data": str(data),
        "postprocess": seg.post.to_json(),
        "n_studies": len(chosen),
        "dice": dice,
        "gate": {
            "on": gate,
            **counts,
            "vertebra_refusal_rate": (
                counts["vertebrae_refused"] / counts["vertebrae_in_truth"]
                if counts["vertebrae_in_truth"]
                else None
            ),
            "by_check": reasons,
        },
        "studies": studies,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """Render :func:`evaluate`'s report as a Markdown table."""
    lines = [
        f"Stage-1 Dice on the original grid: model {report['model']['name']} "
        f"{report['model']['version']}, {report['n_studies']} studies",
        "",
        "| vertebra | Dice |",
        "|---|---|",
    ]
    for k in (*VERTEBRAE, "mean"):
        v = report["dice"].get(k)
        lines.append(f"| {k} | {'n/a' if v is None else f'{v:.4f}'} |")
    gate = report.get("gate") or {}
    if gate.get("on"):
        rate = gate.get("vertebra_refusal_rate")
        lines += [
            "",
            f"Gate on (intended use + plausibility): {gate['studies_refused']} of "
            f"{report['n_studies']} studies refused, {gate['vertebrae_refused']} of "
            f"{gate['vertebrae_in_truth']} vertebrae in the truth refused"
            + ("" if rate is None else f" ({rate:.1%})")
            + (f"; by check: {gate['by_check']}" if gate.get("by_check") else ""),
        ]
    elif gate:
        lines += ["", "Gate off: every label map scored as stage 1 returned it."]
    return "\n".join(lines) + "\n"
