"""A real PostgreSQL server for the tests, started from Debian's binaries.

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` on a free loopback port in a
temporary folder and stops the server afterwards. ``initdb`` and ``postgres`` refuse to
run as root, so as root they run as the ``postgres`` system user (``runuser``), in a
folder that user owns. ``make test`` installs the ``postgresql`` package when
``/usr/lib/postgresql/*/bin/pg_ctl`` is missing.

Outside CI a machine without the binaries skips the PostgreSQL cases with the reason;
with ``CI=true`` it fails them (:func:`require_postgres`), as for the real data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from tests.conftest import free_port, in_ci

SERVICE_USER = "postgres"


def pg_bin_dir() -> Path | None:
    """The ``bin`` folder of the newest installed PostgreSQL (Debian layout), or ``None``."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def _as_user() -> list[str]:
    """The command prefix that runs a server binary as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", SERVICE_USER, "--"]


class PostgresServer:
    """One PostgreSQL cluster on ``127.0.0.1:<free port>`` in a temporary folder.

    Parameters
    ----------
    bin_dir
        Folder of ``initdb``, ``pg_ctl`` and ``postgres``.
    """

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="cspine-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._counter = 0
        self._lock = threading.Lock()
        if os.geteuid() == 0:
            shutil.chown(self.root, SERVICE_USER, SERVICE_USER)

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*_as_user(), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
            cwd=self.root,
        )

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections."""
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        self.start_again()

    def start_again(self) -> None:
        """Start the (stopped) server on its folder and port; wait until it accepts."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
        )

    def halt(self) -> None:
        """Stop the server (fast shutdown), keeping its data for :meth:`start_again`."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.halt()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of a database of this server (psycopg 3 driver)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  # fixed text built here

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        with self._lock:
            self._counter += 1
            name = f"cspine_test_{self._counter}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`create_database` (its connections closed)."""
        name = url.rsplit("/", 1)[1]
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def require_postgres() -> Path:
    """The PostgreSQL ``bin`` folder, or a skip with its reason (a failure in CI)."""
    found = pg_bin_dir()
    reason = None
    if found is None:
        reason = (
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/pg_ctl missing; "
            "make test installs the postgresql package)"
        )
    elif os.geteuid() == 0 and shutil.which("runuser") is None:
        reason = "running as root without runuser: cannot start PostgreSQL unprivileged"
    if reason is None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            reason = "psycopg is not installed (pip install 'psycopg[binary]')"
    if reason is not None:
        if in_ci():
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)", pytrace=False)
        pytest.skip(reason)
    assert found is not None
    return found
