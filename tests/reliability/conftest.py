"""Shared fixtures of the reliability suite: the loopback SCP fixtures of tests/dicom_node."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest
from pynetdicom import _config

from dicom_node.receive import Receiver, open_node_storage
from dicom_node.scp import StorageNode
from tests.dicom_node.conftest import (  # noqa: F401  (pytest fixtures)
    FakeClock,
    RunningNode,
    make_settings,
    node,
    start_node,
)


@pytest.fixture(scope="module")
def module_node(tmp_path_factory) -> Iterator[RunningNode]:
    """One SCP for a whole module, for cases that each leave the store as they found it."""
    old_tempdir, old_chunked = tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET
    settings = make_settings(tmp_path_factory.mktemp("module-node"))
    catalog, store = open_node_storage(settings)
    receiver = Receiver(settings, catalog, store, environ={})
    clock = FakeClock()
    running = RunningNode(settings, StorageNode(settings, receiver, clock=clock), receiver, clock)
    running.node.start()
    yield running
    running.node.stop()
    catalog.dispose()
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET = old_tempdir, old_chunked
