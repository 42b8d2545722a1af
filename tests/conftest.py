"""Shared fixtures: strict pydicom, real-data folder, free ports, temporary settings."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydicom import config as pydicom_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _strict_pydicom():
    """Make pydicom raise on invalid values when writing, as the house style asks."""
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    yield
    pydicom_config.settings.writing_validation_mode = old


def real_data_dir() -> Path | None:
    """The folder of third-party DICOM files named by ``CSPINE_REAL_DATA``, if set."""
    value = os.environ.get("CSPINE_REAL_DATA")
    return Path(value).resolve() if value else None


@pytest.fixture
def real_data() -> Path:
    """Folder of real public DICOM files; tests using it run when CSPINE_REAL_DATA is set."""
    path = real_data_dir()
    if path is None:
        pytest.skip("CSPINE_REAL_DATA is not set (it is always set in CI by .ci/run)")
    if not path.is_dir():
        pytest.fail(f"CSPINE_REAL_DATA={path} is not a folder")
    return path


def free_port() -> int:
    """Return a TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
