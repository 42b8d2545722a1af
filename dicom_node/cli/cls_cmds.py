"""``cspine train cls`` and ``cspine evaluate cls``."""

from __future__ import annotations

import click

TRAIN: dict[str, click.Command] = {}
EVALUATE: dict[str, click.Command] = {}
