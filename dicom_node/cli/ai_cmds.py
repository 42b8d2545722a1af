"""``cspine train``, ``evaluate`` and ``calibrate`` groups; stage commands: seg_cmds/cls_cmds."""

from __future__ import annotations

import click

from dicom_node.cli import cls_cmds, seg_cmds


@click.group()
def train() -> None:
    """Train a stage on the RSNA 2022 dataset layout."""


@click.group()
def evaluate() -> None:
    """Evaluate a stage on the RSNA 2022 dataset layout."""


@click.group()
def calibrate() -> None:
    """Add OOD statistics and calibration to a trained package (no retraining)."""


for _module in (seg_cmds, cls_cmds):
    for _name, _command in _module.TRAIN.items():
        train.add_command(_command, _name)
    for _name, _command in _module.EVALUATE.items():
        evaluate.add_command(_command, _name)
    for _name, _command in getattr(_module, "CALIBRATE", {}).items():
        calibrate.add_command(_command, _name)

COMMANDS: list[click.Command] = [train, evaluate, calibrate]
