"""Loopback SCP fixtures on free ports."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import _config

from config import Settings, load_settings
from dicom_node.receive import Receiver, open_node_storage
from dicom_node.scp import StorageNode
from tests.conftest import free_port


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningNode:
    settings: Settings
    node: StorageNode
    receiver: Receiver
    clock: FakeClock

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def store_root(self) -> Path:
        return self.receiver.store.root


def make_settings(tmp_path: Path, **sections: dict) -> Settings:
    data = {
        "storage": {"data_dir": str(tmp_path / "var"), "min_free_bytes": 0},
        "node": {"port": free_port(), "acse_timeout": 5, "dimse_timeout": 10},
        "completion": {"stable_seconds": 10, "check_interval_seconds": 3600},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return load_settings(overrides=data, environ={})


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator:
    """Factory: start an in-process SCP with a fake completion clock."""
    started: list[StorageNode] = []
    old_tempdir = tempfile.tempdir
    old_chunked = _config.STORE_RECV_CHUNKED_DATASET

    def _start(**sections: dict) -> RunningNode:
        settings = make_settings(tmp_path, **sections)
        catalog, store = open_node_storage(settings)
        receiver = Receiver(settings, catalog, store)
        clock = FakeClock()
        node = StorageNode(settings, receiver, clock=clock)
        node.start(block=False)
        started.append(node)
        return RunningNode(settings, node, receiver, clock)

    yield _start
    for node in started:
        node.stop()
        node.receiver.catalog.dispose()
    tempfile.tempdir = old_tempdir
    _config.STORE_RECV_CHUNKED_DATASET = old_chunked


def catalog_on(request, engine: str) -> dict:
    """The ``storage`` settings of a catalog on ``engine`` (``sqlite``: the default file;
    ``postgresql``: a new database of the session's real server, dropped afterwards)."""
    if engine == "sqlite":
        return {}
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    request.addfinalizer(lambda: server.drop_database(url))
    return {"database_url": url}


@pytest.fixture
def node(start_node, request) -> RunningNode:
    """A running SCP with default settings (no peer allow-list).

    ``@pytest.mark.parametrize("node", ENGINES, indirect=True)`` runs a test once per
    catalog engine (:data:`tests.conftest.ENGINES`); unparametrised, SQLite.
    """
    storage = catalog_on(request, getattr(request, "param", "sqlite"))
    return start_node(storage=storage) if storage else start_node()
