"""Retention: ``cspine purge --older-than`` and :func:`storage.purge.purge`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from dicom_node.cli.purge_cmd import purge as purge_command
from dicom_node.receive import Receiver, open_node_storage
from storage import reconcile
from storage.catalog import mark_complete
from storage.jobs import NewOutput, claim_next, complete_job
from storage.models import (
    Base,
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    QuarantinedInstance,
    Study,
    utcnow,
)
from storage.outbox import record_delivery, sync_destinations
from storage.purge import parse_duration, purge
from storage.records import DestinationSpec
from tests.conftest import ENGINES
from tests.dicom_node.conftest import catalog_on, make_settings
from tests.helpers import write_series

PACS = "PACS@127.0.0.1:104"
OLD = dt.timedelta(days=40)


class Site:
    """A catalog and store filled through the real receive path."""

    def __init__(self, tmp_path: Path, storage: dict | None = None) -> None:
        self.tmp = tmp_path
        self.settings = make_settings(tmp_path, storage=storage or {})
        self.catalog, self.store = open_node_storage(self.settings)
        self.receiver = Receiver(self.settings, self.catalog, self.store)
        sync_destinations(
            self.catalog, [DestinationSpec(PACS, "PACS", "127.0.0.1", 104, outputs=("sr",))]
        )

    def study(self, name: str, *, age: dt.timedelta, job: str | None, outbox: str = "SENT") -> int:
        """Receive a 3-slice study, optionally process it; make it ``age`` old."""
        paths = write_series(self.tmp / name, 3, study_uid=generate_uid())
        outcomes = [self.receiver.accept(p, consume=False) for p in paths]
        assert {o.status for o in outcomes} == {0}
        study_id = outcomes[0].study_id
        assert study_id is not None
        if job is not None:
            assert mark_complete(self.catalog, study_id, 3, "test")
            claimed = claim_next(self.catalog, "test:1")
            assert claimed is not None and claimed.study_id == study_id
            if job == "DONE":
                rel = self.store.write_output(claimed.id, "sr.dcm", b"not really an SR")
                out = NewOutput("sr", "1.2.3", generate_uid(), generate_uid(), rel, "0" * 64)
                complete_job(self.catalog, claimed.id, JobState.DONE, "ok", [out])
                if outbox != "PENDING":
                    with self.catalog.read() as s:
                        item = s.scalars(select(OutboxItem)).all()[-1]
                    record_delivery(self.catalog, item.id, OutboxState[outbox], "0x0000")
        when = utcnow() - age

        def age_it(session):
            session.execute(update(Study).where(Study.id == study_id).values(last_received_at=when))

        self.catalog.write(age_it)
        return study_id

    def quarantine_one(self, study_id: int) -> None:
        """Re-send one instance of the study with other pixels: it is quarantined."""
        with self.catalog.read() as s:
            rel = s.scalars(select(Instance.file_path)).first()
        ds = pydicom.dcmread(self.store.root / rel)
        ds.PixelData = bytes(len(ds.PixelData))
        path = self.tmp / "changed.dcm"
        ds.save_as(path, enforce_file_format=True)
        outcome = self.receiver.accept(path, consume=False)
        assert outcome.status == 0 and outcome.reason == "QUARANTINED"
        assert outcome.study_id == study_id

    def files(self) -> set[str]:
        root = self.store.root
        return {
            str(p.relative_to(root))
            for area in ("instances", "quarantine", "outputs")
            for p in (root / area).rglob("*")
            if p.is_file()
        }

    def counts(self) -> dict[str, int]:
        with self.catalog.read() as s:
            return {
                table.name: int(s.scalar(select(func.count()).select_from(table)) or 0)
                for table in Base.metadata.sorted_tables
            }


@pytest.fixture
def site(tmp_path: Path, request):
    """A site on SQLite, or per ``@pytest.mark.parametrize("site", ENGINES, indirect=True)``."""
    s = Site(tmp_path, catalog_on(request, getattr(request, "param", "sqlite")))
    yield s
    s.catalog.dispose()


def test_parse_duration():
    assert parse_duration("30d") == dt.timedelta(days=30)
    assert parse_duration("12h") == dt.timedelta(hours=12)
    assert parse_duration("90m") == dt.timedelta(minutes=90)
    assert parse_duration("2w") == dt.timedelta(days=14)
    for bad in ("", "30", "d", "-1d", "0d", "3 years", "1y"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


@pytest.mark.parametrize("site", ENGINES, indirect=True)
def test_purge_removes_old_idle_studies_and_keeps_busy_and_recent_ones(site):
    done = site.study("done", age=OLD, job="DONE")
    site.quarantine_one(done)
    dead = site.study("dead", age=OLD, job="DONE", outbox="DEAD")
    running = site.study("running", age=OLD, job="RUNNING")
    pending = site.study("pending", age=OLD, job="DONE", outbox="PENDING")
    unprocessed = site.study("unprocessed", age=OLD, job=None)
    recent = site.study("recent", age=dt.timedelta(days=2), job="DONE")
    with site.catalog.read() as s:
        by_study = {}
        for study in s.scalars(select(Study)):
            paths = {i.file_path for se in study.series for i in se.instances}
            by_study[study.id] = paths
        quarantined = set(s.scalars(select(QuarantinedInstance.file_path)))
        outputs = {
            job.study_id: {o.file_path for o in job.outputs} for job in s.scalars(select(Job))
        }
    assert len(quarantined) == 1
    before_files, before_counts = site.files(), site.counts()

    # dry run: the list, and nothing changes
    report = purge(site.catalog, site.store, dt.timedelta(days=30), dry_run=True)
    assert [c.study_id for c in report.studies] == [done, dead, unprocessed]
    assert dict(report.skipped) == {
        running: f"job {_job_id(site, running)} is RUNNING",
        pending: "a delivery is PENDING",
    }
    assert report.bytes_freed > 0
    assert site.files() == before_files and site.counts() == before_counts

    report = purge(site.catalog, site.store, dt.timedelta(days=30))
    gone = {done, dead, unprocessed}
    assert {c.study_id for c in report.studies} == gone
    expected_gone = quarantined | set().union(*(by_study[i] | outputs.get(i, set()) for i in gone))
    assert report.files_removed == len(expected_gone) == 3 * 3 + 1 + 2
    assert site.files() == before_files - expected_gone
    # output folders of purged jobs are removed too
    assert sorted(p.name for p in (site.store.root / "outputs").iterdir()) == sorted(
        str(_job_id(site, i)) for i in (pending, recent)
    )
    with site.catalog.read() as s:
        assert set(s.scalars(select(Study.id))) == {running, pending, recent}
        assert s.scalars(select(QuarantinedInstance)).all() == []
        remaining_jobs = {j.study_id: j.state for j in s.scalars(select(Job))}
    assert remaining_jobs == {
        running: JobState.RUNNING,
        pending: JobState.DONE,
        recent: JobState.DONE,
    }
    counts = site.counts()
    assert counts["studies"] == 3 and counts["series"] == 3 and counts["instances"] == 9
    assert counts["outputs"] == 2 and counts["outbox"] == 2
    # the catalog and the store agree: nothing for start-up repair to remove
    assert reconcile(site.catalog, site.store) == {"tmp": 0, "orphans": 0}
    # a second purge finds nothing more to do
    again = purge(site.catalog, site.store, dt.timedelta(days=30))
    assert again.studies == [] and again.files_removed == 0


def _job_id(site: Site, study_id: int) -> int:
    with site.catalog.read() as s:
        return int(s.scalar(select(Job.id).where(Job.study_id == study_id)))


def test_an_instance_arriving_on_another_host_during_a_purge_keeps_the_study(
    tmp_path: Path, postgres_server
):
    """PostgreSQL: another host's receiver holds the old study's row while it counts a
    new instance into it; the purge waits for it, then sees the study recent and keeps
    it (without the lock it deleted the series under the new instance and failed)."""
    import threading
    import time

    from sqlalchemy import create_engine, text

    url = postgres_server.create_database()
    site = Site(tmp_path, {"database_url": url})
    old = site.study("old", age=OLD, job=None)
    with site.catalog.read() as s:
        series_id = s.scalar(select(Instance.series_id))
    other = create_engine(url)
    reports: list = []
    with other.connect() as conn:
        conn.execute(text("SELECT id FROM studies WHERE id = :id FOR UPDATE"), {"id": old})
        conn.execute(
            text("UPDATE studies SET last_received_at = :now WHERE id = :id"),
            {"now": utcnow(), "id": old},
        )
        conn.execute(
            text(
                "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, "
                "transfer_syntax_uid, file_path, sha256, size_bytes, received_at) VALUES "
                "(:sid, '2.25.7', '1.2', '1.2', 'instances/x.dcm', 'ab', 1, :now)"
            ),
            {"sid": series_id, "now": utcnow()},
        )
        thread = threading.Thread(
            target=lambda: reports.append(purge(site.catalog, site.store, dt.timedelta(days=30)))
        )
        thread.start()
        time.sleep(1.0)
        conn.commit()
    thread.join(30)
    other.dispose()
    (report,) = reports
    assert report.studies == []
    with site.catalog.read() as s:
        assert s.scalar(select(func.count(Instance.id))) == 4
        assert s.get(Study, old) is not None
    site.catalog.dispose()
    postgres_server.drop_database(url)


def test_crash_between_rows_and_files_leaves_orphans_that_reconcile_removes(site, monkeypatch):
    old = site.study("old", age=OLD, job=None)
    site.quarantine_one(old)
    keep = site.study("keep", age=dt.timedelta(hours=1), job=None)
    files_before = site.files()

    def crash(*_args, **_kw):
        raise KeyboardInterrupt("killed after the catalog commit")

    monkeypatch.setattr("storage.purge._unlink_files", crash)
    with pytest.raises(KeyboardInterrupt):
        purge(site.catalog, site.store, dt.timedelta(days=1))
    with site.catalog.read() as s:
        assert set(s.scalars(select(Study.id))) == {keep}
    assert site.files() == files_before  # rows gone, files still there
    repaired = reconcile(site.catalog, site.store)
    assert repaired["orphans"] == 3 + 1
    with site.catalog.read() as s:
        kept = set(s.scalars(select(Instance.file_path)))
    assert site.files() == kept and len(kept) == 3


def test_cli_purge_dry_run_then_purge(site):
    old = site.study("old", age=OLD, job="DONE")
    recent = site.study("recent", age=dt.timedelta(days=1), job=None)
    site.catalog.dispose()
    data_dir = str(site.settings.storage.data_dir)
    runner = CliRunner()
    dry = runner.invoke(purge_command, ["--older-than", "30d", "--dry-run", "--data-dir", data_dir])
    assert dry.exit_code == 0, dry.output
    assert f"would purge study {old} " in dry.output
    assert "would purge 1 studies, 4 files" in dry.output
    assert len(site.files()) == 3 + 3 + 1
    real = runner.invoke(purge_command, ["--older-than", "30d", "--data-dir", data_dir])
    assert real.exit_code == 0, real.output
    assert f"purged study {old} " in real.output
    assert "purged 1 studies, removed 4 files" in real.output
    assert len(site.files()) == 3
    with site.catalog.read() as s:
        assert set(s.scalars(select(Study.id))) == {recent}
    bad = runner.invoke(purge_command, ["--older-than", "soon", "--data-dir", data_dir])
    assert bad.exit_code != 0 and "duration" in str(bad.exception)
