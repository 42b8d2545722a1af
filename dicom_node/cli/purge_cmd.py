"""``cspine purge``: retention of studies, their results and their files."""

from __future__ import annotations

import click

from config import NodeError
from dicom_node.cli.common import make_settings, settings_options


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@click.command()
@settings_options
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="DURATION",
    help="Purge studies whose last instance arrived longer ago than this (30d, 12h, 90m, 2w).",
)
@click.option("--dry-run", is_flag=True, help="List what would be purged; change nothing.")
def purge(config_file: str | None, data_dir: str | None, older_than: str, dry_run: bool) -> None:
    """Delete old studies with their results and files.

    A study is kept while it has a job QUEUED or RUNNING or a delivery PENDING.
    Catalog rows go first, in one transaction; files are unlinked afterwards.
    """
    from dicom_node.receive import open_node_storage
    from storage.purge import parse_duration
    from storage.purge import purge as run_purge

    try:
        period = parse_duration(older_than)
    except ValueError as exc:
        raise NodeError(str(exc)) from exc
    settings = make_settings(config_file, data_dir)
    catalog, store = open_node_storage(settings)
    try:
        report = run_purge(catalog, store, period, dry_run=dry_run)
    finally:
        catalog.dispose()
    verb = "would purge" if dry_run else "purged"
    click.echo(f"cutoff: {report.cutoff:%Y-%m-%d %H:%M:%S}Z (last instance received before)")
    for cand in report.studies:
        click.echo(
            f"{verb} study {cand.study_id}  last received {cand.last_received_at:%Y-%m-%d %H:%M}Z  "
            f"instances {cand.instances}  outputs {cand.outputs}  files {len(cand.files)}  "
            f"{cand.study_instance_uid}"
        )
    for study_id, reason in report.skipped:
        click.echo(f"kept study {study_id}: {reason}")
    if dry_run:
        files = sum(len(c.files) for c in report.studies)
        click.echo(
            f"would purge {len(report.studies)} studies, {files} files, {_mb(report.bytes_freed)}"
        )
    else:
        click.echo(
            f"purged {len(report.studies)} studies, removed {report.files_removed} files, "
            f"freed {_mb(report.bytes_freed)}"
        )


COMMANDS: list[click.Command] = [purge]
