"""Catalog migrations: a new catalog and an upgraded old one end with the same schema,
and an old catalog keeps every row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

from storage import Catalog
from storage.migrate import current_revision, head_revision, upgrade
from storage.models import (
    Base,
    DestinationRow,
    Instance,
    JobEvent,
    OutboxItem,
    OutboxState,
    Refusal,
    StudyEvent,
)

OLD = Path(__file__).with_name("data") / "catalog_pre_migrations.sql"


def _old_catalog(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript(OLD.read_text())
    con.close()


def _schema_diff(catalog: Catalog) -> list:
    with catalog.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_a_new_catalog_is_built_by_the_migrations_and_matches_the_models(database_url):
    catalog = Catalog(database_url)
    assert current_revision(catalog.engine) == head_revision()
    assert _schema_diff(catalog) == []
    assert upgrade(catalog.engine) == (head_revision(), head_revision())
    catalog.dispose()


def test_processes_opening_a_new_catalog_at_once_build_it_once(database_url):
    """Several processes (hosts) start on an empty catalog together: one migrates, the
    others wait for it and find the schema current."""
    import subprocess
    import sys

    code = (
        "import sys; from storage import Catalog; "
        "c = Catalog(sys.argv[1]); c.dispose(); print('ok')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, database_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-800:] for _, err in outs]
    catalog = Catalog(database_url)
    assert current_revision(catalog.engine) == head_revision()
    assert _schema_diff(catalog) == []
    catalog.dispose()


def test_a_catalog_from_before_migrations_upgrades_in_place_with_every_row(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_catalog(path)
    con = sqlite3.connect(path)
    before = {
        t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        for t in ("studies", "series", "instances", "jobs", "job_events", "outputs", "outbox")
    }
    con.close()
    assert before["outbox"] == 3 and before["instances"] == 2

    catalog = Catalog(f"sqlite:///{path}")
    assert current_revision(catalog.engine) == head_revision()
    assert _schema_diff(catalog) == []
    con = sqlite3.connect(path)
    after = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in before}
    con.close()
    assert after == before
    with catalog.read() as s:
        dests = {d.name: d for d in s.scalars(select(DestinationRow))}
        # every old destination string became a row, inactive and without TLS until the
        # receiver's configuration claims it
        assert set(dests) == {"PACS@10.0.0.5:104", "ARCHIVE@10.0.0.6:11112"}
        assert not any(d.active or d.tls for d in dests.values())
        assert (dests["PACS@10.0.0.5:104"].host, dests["PACS@10.0.0.5:104"].port) == (
            "10.0.0.5",
            104,
        )
        items = {
            (i.output_id, i.destination.name): (i.state, i.attempts, i.last_status)
            for i in s.scalars(select(OutboxItem))
        }
        assert items == {
            (1, "PACS@10.0.0.5:104"): (OutboxState.SENT, 1, "0x0000"),
            (2, "PACS@10.0.0.5:104"): (OutboxState.PENDING, 4, "no association"),
            (2, "ARCHIVE@10.0.0.6:11112"): (OutboxState.DEAD, 1, "0xA900"),
        }
        assert len(list(s.scalars(select(Instance)))) == 2
        assert len(list(s.scalars(select(StudyEvent)))) == 1
        assert len(list(s.scalars(select(JobEvent)))) == 1
        assert len(list(s.scalars(select(Refusal)))) == 1


def test_upgrade_is_idempotent_and_reports_where_it_started(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_catalog(path)
    catalog = Catalog(f"sqlite:///{path}")  # upgrades on open
    assert upgrade(catalog.engine) == (head_revision(), head_revision())
    fresh = tmp_path / "fresh.sqlite"
    _old_catalog(fresh)
    from sqlalchemy import create_engine

    assert upgrade(create_engine(f"sqlite:///{fresh}")) == ("pre-migrations", head_revision())


def test_opening_a_catalog_leaves_no_pooled_connection_in_write_mode(tmp_path):
    """A read must not take the write lock: after the migration on open, every pooled
    connection begins reads with a plain BEGIN (a held writer does not block them)."""
    import sqlite3 as sq
    import threading

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}", busy_timeout_ms=200)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        conn = sq.connect(tmp_path / "c.sqlite", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        holding.set()
        release.wait(10)
        conn.execute("COMMIT")
        conn.close()

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        with catalog.read() as s:  # would raise "database is locked" under BEGIN IMMEDIATE
            assert s.scalar(select(Instance.id)) is None
    finally:
        release.set()
        t.join()
        catalog.dispose()


def _previous_release_catalog(url: str) -> None:
    """A catalog as the previous release left it (revision 0002), with a delivery row."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from storage.migrate import _config

    engine = create_engine(url)
    with engine.connect() as conn:
        command.upgrade(_config(conn), "0002")
        conn.execute(
            text(
                "INSERT INTO studies (study_instance_uid, state, received_count, "
                "instance_count, flagged, created_at, last_received_at, completion_count) "
                "VALUES ('1.2.3', 'COMPLETE', 1, 1, false, '2026-01-01', '2026-01-01', 1)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs (study_id, version, state, attempts, created_at, "
                "updated_at) VALUES (1, 1, 'DONE', 1, '2026-01-01', '2026-01-01')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outputs (job_id, kind, sop_class_uid, sop_instance_uid, "
                "series_instance_uid, file_path, sha256) VALUES "
                "(1, 'sr', '1.2', '1.2.9', '1.2.8', 'outputs/1/sr.dcm', 'ab')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO destinations (name, kind, ae_title, host, port, tls, outputs, "
                "active, created_at, updated_at) VALUES ('PACS', 'cstore', 'PACS', "
                "'10.0.0.5', 104, false, 'sr', true, '2026-01-01', '2026-01-01')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outbox (output_id, destination_id, state, attempts, "
                "next_attempt_at) VALUES (1, 1, 'PENDING', 2, '2026-01-01')"
            )
        )
        conn.commit()
    engine.dispose()


def test_the_previous_release_catalog_upgrades_with_cspine_db_upgrade(database_url, tmp_path):
    """``cspine db upgrade`` (CSPINE_STORAGE__DATABASE_URL) takes a catalog of the previous
    release to the newest revision on either engine, keeping its rows, which new rows
    then join."""
    from tests.dicom_node.proc import cspine

    _previous_release_catalog(database_url)
    env = {"CSPINE_STORAGE__DATABASE_URL": database_url}
    args = ("--data-dir", str(tmp_path / "var"))
    done = cspine("db", "current", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert f"catalog revision 0002; newest {head_revision()}" in done.stdout
    done = cspine("db", "upgrade", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert f"catalog upgraded from 0002 to revision {head_revision()}" in done.stdout
    assert "already at revision" in cspine("db", "upgrade", *args, env=env).stdout
    catalog = Catalog(database_url)
    assert _schema_diff(catalog) == []
    with catalog.read() as s:
        (item,) = s.scalars(select(OutboxItem))
        assert (item.state, item.attempts, item.claimed_by) == (OutboxState.PENDING, 2, None)
    from storage.models import DestinationRow as Dest
    from storage.models import Output

    def add(session):  # type: ignore[no-untyped-def]
        out = Output(
            job_id=1,
            kind="seg",
            sop_class_uid="1.2",
            sop_instance_uid="1.2.10",
            series_instance_uid="1.2.8",
            file_path="outputs/1/seg.dcm",
            sha256="cd",
        )
        session.add(out)
        session.flush()
        dest = session.scalars(select(Dest)).one()
        row = OutboxItem(output_id=out.id, destination_id=dest.id, state=OutboxState.PENDING)
        session.add(row)
        session.flush()
        return row.id

    assert catalog.write(add) == 2
    catalog.dispose()
