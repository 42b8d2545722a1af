"""Shared fixtures: strict pydicom, real-data folder, free ports, temporary settings."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import PIL.Image  # noqa: F401  before pydicom (and python-gdcm): see ai/__init__.py
import pytest
from pydicom import config as pydicom_config

ROOT = Path(__file__).resolve().parents[1]

TEST_RECEIVERS = "2"
"""Receiver processes of every ``cspine serve`` the suite starts, unless a test sets
``CSPINE_NODE__RECEIVERS`` itself: several processes (the shared socket, the shared
association count and writer lock are exercised everywhere), but not the default's
two per core. Each receiver process costs about a second of CPU to start, and the
suite starts ``cspine serve`` many times on CI's two cores.
``tests/dicom_node/test_receivers.py::test_serve_with_the_defaults_starts_two_receivers_per_core``
starts it with the defaults."""
os.environ.setdefault("CSPINE_NODE__RECEIVERS", TEST_RECEIVERS)


@pytest.fixture(autouse=True, scope="session")
def _strict_pydicom():
    """Make pydicom raise on invalid values when writing, as the house style asks."""
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    yield
    pydicom_config.settings.writing_validation_mode = old


REAL_DATA_DEFAULT = ROOT.parent / "shared" / "data" / "real"
"""Where the real-data folder lies beside a checkout (``.ci/run`` names it explicitly)."""


def in_ci() -> bool:
    """Whether the suite runs in CI (``CI=true``), where real data must be present."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def real_data_dir() -> Path | None:
    """The folder of real public DICOM and NIfTI files, if one is named or lies beside us.

    ``CSPINE_REAL_DATA`` names it; without it, ``../shared/data/real`` is used when it
    exists. ``None`` when neither is set or present.
    """
    value = os.environ.get("CSPINE_REAL_DATA")
    if value:
        return Path(value).resolve()
    return REAL_DATA_DEFAULT.resolve() if REAL_DATA_DEFAULT.is_dir() else None


def require_real_data() -> Path:
    """The real-data folder, or a skip with its reason (a failure in CI).

    Outside CI a missing folder skips the test that needs it; with ``CI=true`` (as
    ``.ci/run`` runs) a missing folder fails loudly, never skips.
    """
    path = real_data_dir()
    if path is not None and path.is_dir():
        return path
    if path is None:
        reason = (
            "no real-data folder: CSPINE_REAL_DATA is not set and ../shared/data/real is absent"
        )
    else:
        reason = f"CSPINE_REAL_DATA={path} is not a folder"
    if in_ci():
        pytest.fail(f"{reason} (CI=true: real-data tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of real public DICOM files (see :func:`require_real_data`)."""
    return require_real_data()


def free_port() -> int:
    """Return a TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (``tests/storage/pg.py``), stopped at the end."""
    import subprocess

    from tests.storage.pg import PostgresServer, require_postgres

    server = PostgresServer(require_postgres())
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
        server.stop()
        pytest.fail(f"PostgreSQL did not start: {exc.stderr!r} {log}", pytrace=False)
    yield server
    server.stop()


ENGINES = ("sqlite", "postgresql")
"""The catalog engines a parametrised test runs on."""


@pytest.fixture(params=ENGINES)
def database_url(request, tmp_path):
    """URL of an empty catalog database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)
