"""ai.training: checkpoints, the optimiser step and the learning-rate schedules."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ai.training import (
    autocast,
    grad_scaler,
    load_checkpoint,
    one_cycle_lr,
    optimiser_step,
    plain,
    save_checkpoint,
    warmup_cosine_lr,
)


def test_checkpoint_round_trip_and_no_temporary_file_left(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"w": torch.ones(3), "arch": plain({"dims": (1, 2)}), "epoch": 4}, path)
    state = load_checkpoint(path, arch={"dims": (1, 2)})
    assert state["epoch"] == 4 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint({"epoch": 2, "bad": lambda: None}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_checkpoint_for_another_architecture_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint({"arch": {"dims": [1, 2]}, "spec": "a"}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="another arch"):
        load_checkpoint(path, arch={"dims": [1, 3]}, spec="a")
    # a key the checkpoint does not record (written before it was) is not checked
    assert load_checkpoint(path, arch={"dims": (1, 2)}, crop={"size": 64})["spec"] == "a"


def test_optimiser_step_with_and_without_scaler_clips_and_steps() -> None:
    device = torch.device("cpu")
    for scaler in (None, grad_scaler(device)):
        w = torch.nn.Parameter(torch.tensor([1.0]))
        opt = torch.optim.SGD([w], lr=1.0)
        with autocast(device):
            loss = (100.0 * w).sum()
        optimiser_step(loss, opt, scaler, clip_norm=1.0, params=[w])
        assert w.item() == pytest.approx(0.0)  # gradient 100 clipped to 1


def test_learning_rate_schedules() -> None:
    assert one_cycle_lr(0.0, 1.0) == pytest.approx(1 / 25)
    assert one_cycle_lr(0.05, 1.0) == pytest.approx(1.0)
    assert one_cycle_lr(1.0, 1.0) == pytest.approx(1 / 1000)
    assert one_cycle_lr(2.0, 1.0) == one_cycle_lr(1.0, 1.0)
    assert warmup_cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert warmup_cosine_lr(500, 100, 10, 1.0) == pytest.approx(0.0)
