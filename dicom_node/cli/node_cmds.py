"""Node commands: serve, echo, send, import, studies, show."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
