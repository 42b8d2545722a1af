"""One engine and session factory per process, SQLite tuned for a single writer.

SQLite runs in WAL mode with ``synchronous=FULL`` (a committed transaction survives
power loss), a busy timeout, and foreign keys on. Writers in one process are
serialised by a lock; writers in other processes (worker, import) wait on the busy
timeout and :func:`write_retry` keeps a "database is locked" error away from callers
until a deadline, after which :class:`CatalogBusyError` is raised.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import CatalogBusyError
from storage.models import Base

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


def _sqlite_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) and url != prefix else None


def make_engine(url: str, busy_timeout_ms: int = 5000) -> Engine:
    """Create the process's engine and the catalog tables.

    Parameters
    ----------
    url
        SQLAlchemy URL; for SQLite the parent folder is created.
    busy_timeout_ms
        How long one SQLite statement waits for another writer.
    """
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        # Create the file ourselves, owner + group only: SQLite gives its -wal and -shm
        # files the mode of the database file.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o640))
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
        if url.startswith("sqlite")
        else {},
        pool_pre_ping=False,
    )
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # Let SQLAlchemy not issue BEGIN itself; we issue BEGIN IMMEDIATE for writes.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")

    Base.metadata.create_all(engine)
    return engine


class Catalog:
    """The engine, its session factory and the in-process writer lock.

    Create one per process and pass it down.

    Parameters
    ----------
    url
        SQLAlchemy URL of the catalog.
    busy_deadline_s
        How long :meth:`write` keeps retrying while another process holds the lock.
    busy_timeout_ms
        How long one SQLite statement waits for the lock before a retry; a write can
        thus wait up to ``busy_deadline_s`` plus this.
    """

    def __init__(
        self, url: str, *, busy_deadline_s: float = 20.0, busy_timeout_ms: int = 5000
    ) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_ms)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.busy_deadline_s = busy_deadline_s
        self._write_lock = threading.Lock()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading."""
        with self.sessions() as session:
            yield session

    def write(self, fn: Callable[[Session], T], *, deadline_s: float | None = None) -> T:
        """Run ``fn(session)`` in one ``BEGIN IMMEDIATE`` transaction and commit it.

        Retries while another process holds the write lock, up to ``deadline_s``
        (default ``busy_deadline_s``).

        Raises
        ------
        CatalogBusyError
            When the lock is still held by another process after the deadline.
        """
        limit = self.busy_deadline_s if deadline_s is None else deadline_s
        deadline = time.monotonic() + limit
        delay = 0.05
        while True:
            try:
                with self._write_lock, self.engine.connect() as conn:
                    conn.info["write"] = True
                    try:
                        with conn.begin(), Session(bind=conn, expire_on_commit=False) as session:
                            result = fn(session)
                            session.flush()
                    finally:
                        conn.info.pop("write", None)
                return result
            except OperationalError as exc:
                text = str(exc).lower()
                if "locked" not in text and "busy" not in text:
                    raise
                if time.monotonic() >= deadline:
                    raise CatalogBusyError(
                        f"catalog locked by another writer for more than {limit:.0f} s"
                    ) from exc
                LOGGER.warning("catalog busy, retrying in %.2f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()
