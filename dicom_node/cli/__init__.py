"""The ``cspine`` admin CLI.

Every subcommand accepts ``--config FILE`` and ``--data-dir DIR``; settings are
loaded once per invocation and passed down. Expected failures (:class:`NodeError`)
exit non-zero with a one-line reason and no stack trace.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from config import NodeError
from dicom_node.cli import ai_cmds, db_cmds, job_cmds, node_cmds, purge_cmd, synth_cmd


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NodeError as exc:
            click.echo(f"cspine: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cspine-node")
def main() -> None:
    """cspine-node: a DICOM node that finds cervical-spine fractures in CT."""


for _module in (node_cmds, job_cmds, db_cmds, purge_cmd, synth_cmd, ai_cmds):
    for _command in _module.COMMANDS:
        main.add_command(_command)
