"""Job commands: worker, replay, resend, results, status."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from config import Settings
from dicom_node.cli.common import configure_logging, make_settings, settings_options


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
    from storage.jobs import replay_study

    settings = make_settings(config_file, data_dir)
    catalog, _ = open_node_storage(settings)
    version = replay_study(catalog, study)
    click.echo(f"queued version {version} of study {study}")


@click.command()
@settings_options
@click.argument("study")
@click.option(
    "--to",
    "to",
    default=None,
    metavar="DESTINATION",
    help="Only this configured destination (its name, AE@HOST:PORT or id).",
)
def resend(config_file: str | None, data_dir: str | None, study: str, to: str | None) -> None:
    """Send the newest results of STUDY again (same SOP Instance UIDs).

    Dead letters of that result are queued again with a fresh attempt count. Only
    destinations the running node has configured are used, over their own transport.
    """
    from dicom_node.destinations import choose
    from dicom_node.receive import open_node_storage
    from storage.jobs import resend_results

    settings = make_settings(config_file, data_dir)
    catalog, _ = open_node_storage(settings)
    n = resend_results(catalog, study, choose(catalog, to))
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
    s = find_study(catalog, study)
    for line in result_lines(catalog, s.id):
        click.echo(line)


@click.command()
@settings_options
def status(config_file: str | None, data_dir: str | None) -> None:
    """Queue depth, worker state, outbox and recent failures."""
    from dicom_node.receive import open_node_storage
    from dicom_node.reports import status_lines
    from storage.jobs import status_report
    from storage.journal import Journal

    settings = make_settings(config_file, data_dir)
    catalog, store = open_node_storage(settings)
    for line in status_lines(status_report(catalog)):
        click.echo(line)
    if (store.root / "journal").is_dir():
        journal = Journal(store.root, fsync=False)
        click.echo(
            f"ingest journal: {journal.count()} answered, not yet cataloged; "
            f"{journal.bad_count()} set aside in {journal.bad_dir}"
        )


COMMANDS: list[click.Command] = [worker, replay, resend, results, status]
