"""One engine and session factory per process, on SQLite or PostgreSQL.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` (a committed
transaction survives power loss), a busy timeout, and foreign keys on; a write
transaction starts with ``BEGIN IMMEDIATE``. PostgreSQL (``postgresql+psycopg://``, for
several receivers and workers on several hosts) runs at READ COMMITTED; the rules that
must hold across hosts rest on unique constraints and row locks (``SELECT ... FOR
UPDATE [SKIP LOCKED]``, which SQLAlchemy leaves out on SQLite, where the write lock
already serialises writers).

Writers in one process are serialised by a lock, and those waiting for it together
share one commit (group commit, :meth:`Catalog.write`). On a SQLite file, writers in
several processes (receivers, worker, CLI) queue on an ``flock`` of
``<catalog>.writelock`` (:class:`ProcessWriteLock`), which the kernel hands to the next
waiter the moment it is released; SQLite's own busy handler instead polls with sleeps
of 1 ms growing to 100 ms, which left a second receiver process waiting more than it
worked. A transient failure (SQLite:
"database is locked"; PostgreSQL: a lost or refused connection, a deadlock, a
serialisation failure) is retried until a deadline, after which
:class:`CatalogBusyError` is raised, so a receiver answers 0xA700 and never
acknowledges what it could not commit.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import CatalogBusyError
from storage.migrate import upgrade

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


def _sqlite_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) and url != prefix else None


def is_postgres(url_or_engine: str | Engine) -> bool:
    """Whether a URL or engine is PostgreSQL."""
    if isinstance(url_or_engine, Engine):
        return url_or_engine.dialect.name == "postgresql"
    return url_or_engine.startswith("postgresql")


def transient(exc: BaseException, engine: Engine) -> bool:
    """Whether a database error is worth retrying (lock wait, lost connection).

    SQLite: "database is locked" or "busy". PostgreSQL: any operational error (refused
    or lost connection, deadlock, serialisation failure, lock not available) and a
    connection closed under us.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if engine.dialect.name == "sqlite":
        text = str(exc).lower()
        return isinstance(exc, OperationalError) and ("locked" in text or "busy" in text)
    return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)


def make_engine(url: str, busy_timeout_ms: int = 5000, *, migrate: bool = True) -> Engine:
    """Create the process's engine and bring the catalog to the newest schema.

    Parameters
    ----------
    url
        SQLAlchemy URL; for SQLite the parent folder is created.
    busy_timeout_ms
        How long one SQLite statement waits for another writer; on PostgreSQL, how
        long a connection attempt may take (at least 1 s).
    migrate
        Upgrade the schema to the newest revision (:func:`storage.migrate.upgrade`).
    """
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        # Create the file ourselves, owner + group only: SQLite gives its -wal and -shm
        # files the mode of the database file.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o640))
    if is_postgres(url):
        # one pooled connection per association thread at most; a connection that the
        # server dropped is replaced before use rather than failing the statement
        engine = create_engine(
            url,
            connect_args={"connect_timeout": max(1, busy_timeout_ms // 1000)},
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=30,
            pool_timeout=busy_timeout_ms / 1000,
        )
    else:
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
            if url.startswith("sqlite")
            else {},
            pool_pre_ping=False,
        )
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy not issue BEGIN itself; we issue BEGIN IMMEDIATE for writes.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")

    if migrate:
        upgrade(engine)
    return engine


class ProcessWriteLock:
    """An exclusive ``flock`` on a lock file, with a deadline, shared by processes.

    Each acquisition opens the file anew (an ``flock`` belongs to an open file
    description, so threads never share one by accident) and closing the descriptor
    releases it, also when the process dies. An uncontended acquisition is one
    non-blocking call; a contended one waits in the kernel, in a daemon thread, so that
    the caller can give up at its deadline; a lock granted after the caller gave up is
    released at once.

    Parameters
    ----------
    path
        The lock file (created ``0o640`` if missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def acquire(self, timeout_s: float) -> int | None:
        """The locked descriptor, or ``None`` when the lock was not granted in time."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        granted = threading.Event()
        guard = threading.Lock()
        abandoned: list[bool] = []
        errors: list[OSError] = []

        def wait() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                errors.append(exc)
            with guard:
                if abandoned:
                    os.close(fd)
                else:
                    granted.set()

        threading.Thread(target=wait, name="cspine-flock", daemon=True).start()
        granted.wait(max(0.0, timeout_s))
        with guard:
            if not granted.is_set():
                abandoned.append(True)  # closed by the waiter when flock returns
                return None
        if errors:
            os.close(fd)
            raise errors[0]
        return fd

    @staticmethod
    def release(fd: int) -> None:
        """Release a lock returned by :meth:`acquire`."""
        os.close(fd)


class _Pending:
    """One :meth:`Catalog.write` call waiting for, or done with, its commit."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[Session], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


def _in_savepoint(
    session: Session, fn: Callable[[Session], Any], engine: Engine
) -> tuple[Any, Exception | None]:
    """``fn(session)`` in a SAVEPOINT: its result, or its exception after a rollback to it.

    A transient error (:func:`transient`) is raised (the whole batch is retried), any
    other error is returned.
    """
    try:
        with session.begin_nested():
            result = fn(session)
            session.flush()
        return result, None
    except Exception as exc:
        if transient(exc, engine):
            raise
        return None, exc


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
        db_file = _sqlite_path(url)
        self._process_lock = (
            ProcessWriteLock(db_file.with_name(db_file.name + ".writelock"))
            if db_file is not None and db_file.name != ":memory:"
            else None
        )
        self._pending_lock = threading.Lock()
        self._pending: list[_Pending] = []

    @property
    def postgres(self) -> bool:
        """Whether the catalog is on PostgreSQL."""
        return is_postgres(self.engine)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading.

        Raises
        ------
        CatalogBusyError
            On PostgreSQL, when the server cannot be reached (a transient failure).
        """
        try:
            with self.sessions() as session:
                yield session
        except DBAPIError as exc:
            if self.postgres and transient(exc, self.engine):
                raise CatalogBusyError(f"catalog unreachable: {type(exc.orig).__name__}") from exc
            raise

    def write(self, fn: Callable[[Session], T], *, deadline_s: float | None = None) -> T:
        """Run ``fn(session)`` in a write transaction (``BEGIN IMMEDIATE`` on SQLite) and commit it.

        Group commit: calls from several threads of this process that wait for the
        writer lock at the same time are run by whichever gets it first, each in its own
        SAVEPOINT of one transaction, and committed together, so they share one commit
        (one WAL fsync with ``synchronous=FULL``). An exception in one ``fn`` rolls back
        its savepoint only and is raised to its caller; none of them returns before the
        common commit is durable. A call with its own ``deadline_s`` runs alone.

        Retries while another process holds the write lock, up to ``deadline_s``
        (default ``busy_deadline_s``).

        Raises
        ------
        CatalogBusyError
            When the lock is still held by another process after the deadline.
        """
        item = _Pending(fn)
        if deadline_s is not None:
            with self._write_lock:
                self._run_batch([item], deadline_s)
        else:
            with self._pending_lock:
                self._pending.append(item)
            while not item.done:
                with self._write_lock:
                    if item.done:
                        break
                    with self._pending_lock:
                        batch, self._pending = self._pending, []
                    self._run_batch(batch, self.busy_deadline_s)
        if item.error is not None:
            raise item.error
        return item.result

    def _run_batch(self, batch: list[_Pending], limit: float) -> None:
        """Run and commit ``batch`` (under the writer lock); every item ends done."""
        try:
            self._commit_batch(batch, limit)
        except BaseException as exc:
            for item in batch:
                if not item.done:
                    item.error, item.done = exc, True
            raise

    def _commit_batch(self, batch: list[_Pending], limit: float) -> None:
        deadline = time.monotonic() + limit
        delay = 0.05
        while True:
            outcomes: list[tuple[Any, BaseException | None]] = []
            held = self._lock_processes(deadline, limit)
            try:
                with self.engine.connect() as conn:
                    conn.info["write"] = True
                    try:
                        with conn.begin(), Session(bind=conn, expire_on_commit=False) as session:
                            if len(batch) == 1:
                                outcomes.append((batch[0].fn(session), None))
                                session.flush()
                            else:
                                for item in batch:
                                    outcomes.append(_in_savepoint(session, item.fn, self.engine))
                    finally:
                        conn.info.pop("write", None)
            except DBAPIError as exc:
                if not transient(exc, self.engine):
                    raise
                if held is not None:
                    ProcessWriteLock.release(held)
                    held = None
                if time.monotonic() >= deadline:
                    what = "unreachable or locked" if self.postgres else "locked by another writer"
                    raise CatalogBusyError(f"catalog {what} for more than {limit:.0f} s") from exc
                LOGGER.warning("catalog busy, retrying in %.2f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            finally:
                if held is not None:
                    ProcessWriteLock.release(held)
            for item, (result, error) in zip(batch, outcomes, strict=True):
                item.result, item.error, item.done = result, error, True
            return

    def _lock_processes(self, deadline: float, limit: float) -> int | None:
        """Take the cross-process writer lock (SQLite file catalogs; else ``None``).

        Raises
        ------
        CatalogBusyError
            When another process holds it past ``deadline``.
        """
        if self._process_lock is None:
            return None
        fd = self._process_lock.acquire(deadline - time.monotonic())
        if fd is None:
            raise CatalogBusyError(f"catalog locked by another writer for more than {limit:.0f} s")
        return fd

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()
