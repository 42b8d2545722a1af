"""``cspine train seg`` and ``cspine evaluate seg``."""

from __future__ import annotations

import click

TRAIN: dict[str, click.Command] = {}
EVALUATE: dict[str, click.Command] = {}
