"""Node commands: serve, echo, send, import, studies, show."""

from __future__ import annotations

import signal
import ssl
import sys

import click

from config import NodeError, Settings, parse_ae_spec
from dicom_node.cli.common import make_settings, quiet_client_logging, settings_options


def _fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


@click.command()
@settings_options
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Listening port (default 11112).")
@click.option("--ae-title", default=None, help="Our AE title (default CSPINE).")
@click.option("--stable-seconds", type=float, default=None, help="Quiet period before COMPLETE.")
@click.option(
    "--destination",
    "destinations",
    multiple=True,
    metavar="AE@HOST:PORT",
    help="Send results here (repeatable); replaces configured destinations.",
)
@click.option("--no-worker", is_flag=True, help="Do not start the local inference worker.")
def serve(
    config_file: str | None,
    data_dir: str | None,
    host: str | None,
    port: int | None,
    ae_title: str | None,
    stable_seconds: float | None,
    destinations: tuple[str, ...],
    no_worker: bool,
) -> None:
    """Run the Storage SCP (and, by default, one local worker process)."""
    from dicom_node.service import run_service

    overrides: dict = {
        "node": {"host": host, "port": port, "ae_title": ae_title},
        "completion": {"stable_seconds": stable_seconds},
    }
    if destinations:
        dests = []
        for spec in destinations:
            ae, h, p = parse_ae_spec(spec)
            dests.append({"ae_title": ae, "host": h, "port": p})
        overrides["destinations"] = dests
    if no_worker:
        overrides["worker"] = {"enabled": False}
    settings = make_settings(config_file, data_dir, overrides)

    def _term(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    run_service(settings, config_file=config_file)


tls_option = click.option(
    "--tls/--no-tls",
    "use_tls",
    default=None,
    help="DICOM TLS with the node's certificate and CA bundle (node.tls). Default: TLS when "
    "the target is a [[destinations]] entry with tls = true.",
)


def _tls_context(
    settings: Settings, use_tls: bool | None, ae_title: str, host: str, port: int
) -> ssl.SSLContext | None:
    """Client TLS context for ``echo``/``send``: forced by ``--tls``, off with ``--no-tls``,
    otherwise that of a matching ``[[destinations]]`` entry."""
    from dicom_node.tls import client_context, destination_context

    if use_tls is None:
        return destination_context(settings, ae_title, host, port)
    return client_context(settings.node.tls) if use_tls else None


@click.command()
@settings_options
@click.argument("target", metavar="HOST:PORT")
@click.option("--ae-title", "called", default="ANY-SCP", help="Called AE title.")
@click.option("--calling-ae", default=None, help="Our AE title (default: node AE title).")
@tls_option
def echo(
    config_file: str | None,
    data_dir: str | None,
    target: str,
    called: str,
    calling_ae: str | None,
    use_tls: bool | None,
) -> None:
    """Send a C-ECHO to HOST:PORT (or AE@HOST:PORT)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # set at import

    from dicom_node.scu import serve_no_requests

    settings = make_settings(config_file, data_dir)
    quiet_client_logging(settings)
    if "@" in target:
        called, host, port = parse_ae_spec(target)
    else:
        host, _, port_text = target.rpartition(":")
        if not host or not port_text.isdigit():
            raise NodeError(f"expected HOST:PORT, got {target!r}")
        port = int(port_text)
    ae = AE(ae_title=calling_ae or settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = settings.node.acse_timeout
    ctx = _tls_context(settings, use_tls, called, host, port)
    assoc = ae.associate(host, port, ae_title=called, tls_args=(ctx, host) if ctx else None)
    if not assoc.is_established:
        raise NodeError(f"C-ECHO to {host}:{port}: association not established")
    serve_no_requests(assoc)
    rsp = assoc.send_c_echo()
    assoc.release()
    status = int(rsp.Status) if "Status" in rsp else None
    if status != 0:
        raise NodeError(f"C-ECHO to {host}:{port}: status {status}")
    click.echo(f"C-ECHO {called}@{host}:{port}: success")


@click.command()
@settings_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--to", "to", required=True, metavar="AE@HOST:PORT", help="Destination AE.")
@click.option("--calling-ae", default=None, help="Our AE title (default: node AE title).")
@tls_option
def send(
    config_file: str | None,
    data_dir: str | None,
    paths: tuple[str, ...],
    to: str,
    calling_ae: str | None,
    use_tls: bool | None,
) -> None:
    """C-STORE files and folders to AE@HOST:PORT."""
    from tqdm import tqdm

    from dicom_node.scu import collect_files, send_paths

    settings = make_settings(config_file, data_dir)
    quiet_client_logging(settings)
    ae, host, port = parse_ae_spec(to)
    files = collect_files(paths)
    if not files:
        raise NodeError("nothing to send")
    bar = tqdm(total=len(files), unit="img", desc=f"send to {ae}", file=sys.stderr)
    summary = send_paths(
        files,
        ae,
        host,
        port,
        calling_ae or settings.node.ae_title,
        progress=lambda _p, _s: bar.update(1),
        timeout=settings.node.dimse_timeout,
        ssl_context=_tls_context(settings, use_tls, ae, host, port),
    )
    bar.close()
    counts: dict[str, int] = {}
    for status in summary.statuses.values():
        key = "not sent" if status is None else f"0x{status:04X}"
        counts[key] = counts.get(key, 0) + 1
    for key, n in sorted(counts.items()):
        click.echo(f"{key}: {n}")
    for path, err in list(summary.errors.items())[:20]:
        click.echo(f"  {path}: {err}", err=True)
    click.echo(f"sent {summary.sent} of {len(files)}")
    if summary.failed:
        raise NodeError(f"{summary.failed} of {len(files)} files were not stored")


@click.command(name="import")
@settings_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def import_(config_file: str | None, data_dir: str | None, paths: tuple[str, ...]) -> None:
    """Ingest files and folders from disk through the same checks as C-STORE."""
    from tqdm import tqdm

    from dicom_node.receive import Receiver, open_node_storage
    from dicom_node.scu import collect_files

    settings = make_settings(config_file, data_dir)
    catalog, store = open_node_storage(settings)
    receiver = Receiver(settings, catalog, store)
    files = collect_files(paths)
    counts: dict[str, int] = {}
    failures: list[str] = []
    for path in tqdm(files, unit="img", desc="import", file=sys.stderr):
        outcome = receiver.accept(path, consume=False)
        key = f"0x{outcome.status:04X} {outcome.reason}".strip()
        counts[key] = counts.get(key, 0) + 1
        if outcome.status != 0:
            failures.append(f"  {path}: {key}")
    for key, n in sorted(counts.items()):
        click.echo(f"{key}: {n}")
    for line in failures[:20]:
        click.echo(line, err=True)
    if failures:
        raise NodeError(f"{len(failures)} of {len(files)} files were refused")


@click.command()
@settings_options
@click.option("--limit", type=int, default=50, show_default=True)
def studies(config_file: str | None, data_dir: str | None, limit: int) -> None:
    """Table of studies: id, state, series and instance counts, age."""
    from dicom_node.receive import open_node_storage
    from storage.catalog import age_seconds, list_studies

    settings = make_settings(config_file, data_dir)
    catalog, _store = open_node_storage(settings)
    rows = list_studies(catalog, limit)
    click.echo(
        f"{'ID':>5}  {'STATE':<10} {'SERIES':>6} {'INST':>6} {'AGE':>6}  {'FLAG':<4} STUDY UID"
    )
    for s in rows:
        click.echo(
            f"{s.id:>5}  {s.state.value:<10} {s.series_count:>6} {s.instance_count:>6} "
            f"{_fmt_age(age_seconds(s.last_received_at)):>6}  {'!' if s.flagged else '':<4} "
            f"{s.study_instance_uid}"
        )
    if not rows:
        click.echo("(no studies)")


@click.command()
@settings_options
@click.argument("study")
def show(config_file: str | None, data_dir: str | None, study: str) -> None:
    """Series, counts, states and audit trail of STUDY (catalog id or Study Instance UID)."""
    from dicom_node.receive import open_node_storage
    from dicom_node.reports import job_lines
    from storage.catalog import find_study
    from storage.jobs import study_jobs

    settings = make_settings(config_file, data_dir)
    catalog, _store = open_node_storage(settings)
    s = find_study(catalog, study)
    click.echo(f"study {s.id}  {s.study_instance_uid}")
    click.echo(f"  state: {s.state.value}   instances: {s.instance_count}")
    click.echo(f"  date: {s.study_date or '-'}   description: {s.study_description or '-'}")
    if s.flagged:
        click.echo(f"  FLAGGED: {s.flag_reason}")
    click.echo("  series:")
    for se in s.series:
        lossy = " lossy" if se.lossy else ""
        click.echo(
            f"    #{se.series_number if se.series_number is not None else '-'} "
            f"{se.modality or '-'} {se.instance_count} instances{lossy}  "
            f"{se.series_description or ''}  {se.series_instance_uid}"
        )
    click.echo("  audit:")
    for ev in s.events:
        click.echo(f"    {ev.at:%Y-%m-%d %H:%M:%S}Z {ev.kind}: {ev.detail or ''}")
    for line in job_lines(study_jobs(catalog, s.id)):
        click.echo(line)


COMMANDS: list[click.Command] = [serve, echo, send, import_, studies, show]
