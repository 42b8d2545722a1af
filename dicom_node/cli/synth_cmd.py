"""``cspine synth``: synthetic cervical-spine CT studies (owned by the synthetic-data work)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
