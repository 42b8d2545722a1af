"""What the stage-1 and stage-2 training loops share.

* **Mixed precision:** :func:`autocast` (float16 on CUDA, nothing on CPU) and
  :func:`grad_scaler` (a ``GradScaler`` enabled on CUDA only); :func:`optimiser_step` runs
  the scaled backward pass, optional gradient clipping and the step.
* **Checkpoints:** :func:`save_checkpoint` writes a ``torch.save`` file beside the target
  and renames it over the target, so an interrupted save leaves the previous checkpoint
  whole; :func:`load_checkpoint` reads one back and refuses it when it was written for
  another architecture or input specification.
* **Training state:** :func:`training_states` gathers the state dicts of the model,
  optimiser and gradient scaler under the keys a loop's checkpoints use, and
  :func:`restore_training_states` loads them back when a run resumes.
* **Learning-rate schedules:** :func:`one_cycle_lr` (stage 1, by fraction of the run) and
  :func:`warmup_cosine_lr` (stage 2, by step); :func:`set_lr` applies a value.

:mod:`ai.seg.train` and :mod:`ai.cls.train` keep their own data, losses and packages.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch


def autocast(device: torch.device) -> AbstractContextManager[object]:
    """Float16 autocast on CUDA; a context that does nothing on other devices.

    Parameters
    ----------
    device
        The device the forward pass runs on.

    Returns
    -------
    contextlib.AbstractContextManager
        ``torch.autocast("cuda", dtype=torch.float16)`` or ``contextlib.nullcontext()``.
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler for float16 training, enabled only on CUDA.

    On other devices its ``scale``, ``step`` and ``update`` pass through, so the loops need
    no device test of their own.
    """
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda")


def optimiser_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    *,
    clip_norm: float | None = None,
    params: Iterable[torch.nn.Parameter] = (),
) -> None:
    """Zero the gradients, back-propagate ``loss`` (through ``scaler``) and step ``opt``.

    Parameters
    ----------
    loss
        Scalar loss of the batch.
    opt
        Optimiser to step.
    scaler
        From :func:`grad_scaler`, or ``None`` for a float32 phase.
    clip_norm
        When given, the gradients of ``params`` are unscaled and clipped to this total norm
        before the step.
    params
        Parameters to clip (needed with ``clip_norm``).
    """
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if clip_norm is not None:
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(list(params), clip_norm)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` so that ``path`` is always a whole checkpoint.

    The state goes to ``<path>.tmp`` in the same folder, is flushed to disk, and is
    renamed over ``path``; a run killed or failing during the save keeps the previous
    checkpoint (a failed save removes its temporary file).

    Parameters
    ----------
    state
        Tensors, state dicts and plain values (loadable with ``weights_only=True``).
    path
        The checkpoint file.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists, keys as strings).

    Checkpoints record architecture and input parameters in this form, so that a value
    read back compares equal to the one the current run computes.
    """
    return json.loads(json.dumps(value))


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", **expected: Any
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, checking what it was made for.

    Parameters
    ----------
    path
        The checkpoint file.
    map_location
        Where its tensors are loaded.
    **expected
        Values the checkpoint must record under the same key (compared in their
        :func:`plain` form), e.g. ``arch=...`` and ``spec=...``. A key the checkpoint does
        not record (one written before it was recorded) is not checked.

    Returns
    -------
    dict
        The saved state.

    Raises
    ------
    ValueError
        When the checkpoint records a different value for a key of ``expected``.
    """
    state: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
    differ = [k for k, v in expected.items() if k in state and plain(state[k]) != plain(v)]
    if differ:
        raise ValueError(
            f"{path} was written for another {' and '.join(differ)}; "
            "start without resuming or use its settings"
        )
    return state


def training_states(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    net_key: str = "net",
    opt_key: str = "opt",
) -> dict[str, Any]:
    """The state dicts of a run's model, optimiser and scaler, as a checkpoint holds them.

    Parameters
    ----------
    net, opt, scaler
        The model, its optimiser and the gradient scaler of the run.
    net_key, opt_key
        Checkpoint keys of the model and the optimiser (stage 1 uses ``"model"`` and
        ``"optimizer"``); the scaler is always under ``"scaler"``.

    Returns
    -------
    dict
        ``{net_key: ..., opt_key: ..., "scaler": ...}``, in that order, for the loop to
        extend with its own entries before :func:`save_checkpoint`.
    """
    return {net_key: net.state_dict(), opt_key: opt.state_dict(), "scaler": scaler.state_dict()}


def restore_training_states(
    state: Mapping[str, Any],
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    net_key: str = "net",
    opt_key: str = "opt",
) -> None:
    """Load what :func:`training_states` saved back into the model, optimiser and scaler.

    Parameters
    ----------
    state
        A checkpoint read with :func:`load_checkpoint`.
    net, opt, scaler
        Where the states go.
    net_key, opt_key
        As for :func:`training_states`. A checkpoint without a ``"scaler"`` entry (one
        written before the scaler was saved) leaves ``scaler`` as it is.
    """
    net.load_state_dict(state[net_key])
    opt.load_state_dict(state[opt_key])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])


def one_cycle_lr(frac: float, peak: float) -> float:
    """One-cycle learning rate at ``frac`` (0..1) of the run.

    5 % linear warm-up from ``peak / 25``, then cosine decay to ``peak / 1000``. Stage 1
    passes the larger of the step fraction and the wall-time fraction, so a time-limited
    run still anneals.
    """
    frac = min(max(frac, 0.0), 1.0)
    if frac < 0.05:
        return peak / 25 + (peak - peak / 25) * frac / 0.05
    cos = 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95))
    return peak / 1000 + (peak - peak / 1000) * cos


def warmup_cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up over ``warmup`` steps to
    ``base``, then cosine decay to 0 (held at 0 past ``total``)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``opt``."""
    for group in opt.param_groups:
        group["lr"] = lr


__all__ = [
    "autocast",
    "grad_scaler",
    "load_checkpoint",
    "one_cycle_lr",
    "optimiser_step",
    "plain",
    "restore_training_states",
    "save_checkpoint",
    "set_lr",
    "training_states",
    "warmup_cosine_lr",
]
