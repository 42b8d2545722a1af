"""Job commands: worker, replay, resend, results, status."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

from config import NodeError, Settings, parse_ae_spec
from dicom_node.cli.common import configure_logging, make_settings, settings_options

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@click.command()
@settings_options
@click.option("--settings-file", type=click.Path(dir_okay=False), default=None, hidden=True)
@click.option("--parent-pid", type=int, default=None, hidden=True)
def worker(
    config_file: str | None,
    data_dir: str | None,
    settings_file: str | None,
    parent_pid: int | None,
) -> None:
    """Run an inference worker on its own (``serve`` starts one by default)."""
    from dicom_node.receive import open_node_storage
    from dicom_node.worker import Worker

    if parent_pid is not None:
        die_with_parent(parent_pid)

    if settings_file:
        settings = Settings.model_validate_json(Path(settings_file).read_text())
        configure_logging(settings.logging.level)
    else:
        settings = make_settings(config_file, data_dir)
    catalog, store = open_node_storage(settings)
    w = Worker(settings, catalog, store)
    signal.signal(signal.SIGTERM, lambda *_: w.stop_event.set())
    try:
        w.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        catalog.dispose()


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when ``parent_pid`` (``cspine serve``) dies.

    A worker must never outlive the node that started it: a restarted node starts its
    own worker, and re-queues the RUNNING job of the killed one. Linux only
    (``PR_SET_PDEATHSIG``); if the parent is already gone, exit at once.
    """
    import ctypes
    import os
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        raise SystemExit("parent process is gone; worker not started")


@click.command()
@settings_options
@click.argument("study")
def replay(config_file: str | None, data_dir: str | None, study: str) -> None:
    """Queue a new job for STUDY from its stored images (a new result version)."""
    from dicom_node.receive import open_node_storage
    from storage.catalog import find_study
    from storage.jobs import enqueue_job

    settings = make_settings(config_file, data_dir)
    catalog, _ = open_node_storage(settings)

    def queue(session: Session) -> int:
        s = find_study(session, study)
        return enqueue_job(session, s.id, "replay requested").version

    version = catalog.write(queue)
    click.echo(f"queued version {version} of study {study}")


@click.command()
@settings_options
@click.argument("study")
@click.option("--to", "to", default=None, metavar="AE@HOST:PORT", help="Only this destination.")
def resend(config_file: str | None, data_dir: str | None, study: str, to: str | None) -> None:
    """Send the newest results of STUDY again (same SOP Instance UIDs)."""
    from dicom_node.jobs import latest_job
    from dicom_node.receive import open_node_storage
    from dicom_node.worker import destination_kinds
    from storage.catalog import find_study
    from storage.jobs import queue_deliveries
    from storage.models import JobState

    settings = make_settings(config_file, data_dir)
    catalog, _ = open_node_storage(settings)
    if to:
        ae, host, port = parse_ae_spec(to)
        dests: dict[str, tuple[str, ...]] = {f"{ae}@{host}:{port}": ("seg", "sr", "summary")}
    else:
        dests = destination_kinds(settings)
    if not dests:
        raise NodeError("no destination: configure [[destinations]] or use --to AE@HOST:PORT")

    def queue(session: Session) -> int:
        s = find_study(session, study)
        job = latest_job(session, s.id, (JobState.DONE, JobState.NOT_PROCESSED))
        if job is None or not job.outputs:
            raise NodeError(f"study {study} has no results to send")
        return queue_deliveries(session, job.outputs, list(dests), kinds=dests)

    n = catalog.write(queue)
    click.echo(f"queued {n} deliveries; the running node sends them")


@click.command()
@settings_options
@click.argument("study")
def results(config_file: str | None, data_dir: str | None, study: str) -> None:
    """Probabilities, assessed flags, series used, model versions and timings of STUDY."""
    from dicom_node.jobs import result_lines
    from dicom_node.receive import open_node_storage
    from storage.catalog import find_study

    settings = make_settings(config_file, data_dir)
    catalog, _ = open_node_storage(settings)
    with catalog.read() as session:
        s = find_study(session, study)
        for line in result_lines(session, s.id):
            click.echo(line)


@click.command()
@settings_options
def status(config_file: str | None, data_dir: str | None) -> None:
    """Queue depth, worker state, outbox and recent failures."""
    from dicom_node.jobs import status_lines
    from dicom_node.receive import open_node_storage

    settings = make_settings(config_file, data_dir)
    catalog, _ = open_node_storage(settings)
    with catalog.read() as session:
        for line in status_lines(session):
            click.echo(line)


COMMANDS: list[click.Command] = [worker, replay, resend, results, status]
