"""Schema migrations of the catalog (Alembic), run when a catalog is opened.

Three cases, decided on one connection:

* an empty database is built by running every migration from the start, so a new
  catalog and an upgraded one have the same schema by construction;
* a catalog made before migrations existed (tables, no ``alembic_version``) is stamped
  with the baseline revision ``0001`` (the schema every earlier release created) and
  upgraded from there, in place, without losing a row;
* a catalog already under Alembic is upgraded to the newest revision (nothing to do
  when it is current).

One migrator at a time: on SQLite the migration runs under ``BEGIN IMMEDIATE``; on
PostgreSQL (where DDL is transactional too) it first takes a transaction-level advisory
lock, so processes of several hosts that open a new catalog at once build it once.

``cspine db upgrade`` runs the same on demand, ``cspine db current`` shows the
revision. The ``alembic`` command line is not needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

LOGGER = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
"""The schema of every release before the catalog had migrations."""
MIGRATION_LOCK = 0x63737069  # "cspi"
"""PostgreSQL advisory lock key held while a process migrates the catalog."""


def _quiet() -> None:
    # Alembic logs each step at INFO; the node logs the outcome itself
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _config(conn: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The catalog's revision; ``None`` for a catalog not (yet) under migrations."""
    _quiet()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the catalog to the newest revision.

    Returns
    -------
    tuple
        The revision before (``None`` for an empty database, ``"pre-migrations"``
        for a catalog older than migrations) and after.
    """
    _quiet()
    with engine.connect() as conn:
        # BEGIN IMMEDIATE on SQLite: one migrator at a time. ``info`` belongs to the
        # pooled connection, so the flag must go before the connection is reused for
        # reads (a read under BEGIN IMMEDIATE would wait for every writer).
        conn.info["write"] = True
        try:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            before: str | None = MigrationContext.configure(conn).get_current_revision()
            cfg = _config(conn)
            if before is None and inspect(conn).has_table("studies"):
                command.stamp(cfg, BASELINE)
                before = "pre-migrations"
            command.upgrade(cfg, "head")
            conn.commit()
        finally:
            conn.info.pop("write", None)
    after = head_revision()
    if before is None:
        LOGGER.debug("new catalog at schema revision %s", after)
    elif before != after:
        LOGGER.info("catalog schema upgraded from=%s to=%s", before, after)
    return before, after
