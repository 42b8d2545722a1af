"""STOW-RS destinations: the outbox delivers into a real loopback Orthanc with its
DICOMweb plugin, and a server that does not answer is retried, then dead-lettered after
``delivery.max_attempts``, like a C-STORE destination."""

from __future__ import annotations

import datetime as dt
import io
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select, update

from dicom_node.delivery import deliver_due
from storage.models import OutboxItem
from tests.interop.ohif import ToolMissing, dicomweb_orthanc
from tests.interop.orthanc import Orthanc
from tests.reliability.outbox import content_key, outbox_node


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    try:
        server = dicomweb_orthanc(tmp_path / "orthanc")
    except ToolMissing as exc:
        pytest.skip(str(exc))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _stow(orthanc: Orthanc, **extra: object) -> dict:
    return {"name": "web-pacs", "kind": "stow", "url": f"{orthanc.url}/dicom-web", **extra}


def _rows(catalog) -> list[tuple[str, int, str | None, str | None]]:
    with catalog.read() as s:
        items = s.scalars(select(OutboxItem).order_by(OutboxItem.id))
        return [(i.state.value, i.attempts, i.last_status, i.last_error) for i in items]


def _make_due(catalog) -> None:
    catalog.write(
        lambda s: s.execute(update(OutboxItem).values(next_attempt_at=dt.datetime(2000, 1, 1)))
    )


def test_outputs_are_stowed_into_orthanc_and_read_back_byte_for_byte(tmp_path, orthanc):
    node = outbox_node(tmp_path, [_stow(orthanc)])
    try:
        assert deliver_due(node.settings, node.catalog, node.store) == 3
        assert [r[:3] for r in _rows(node.catalog)] == [("SENT", 1, "0x0000")] * 3
        # read back over QIDO-RS (the DICOMweb plugin) ...
        qido = DICOMwebClient(f"{orthanc.url}/dicom-web")
        found = {
            str(pydicom.Dataset.from_json(d).SOPInstanceUID) for d in qido.search_for_instances()
        }
        assert found == set(node.sent)
        # ... and the files themselves over Orthanc's REST API: the same objects
        for orthanc_id in orthanc.get("/instances"):
            url = f"{orthanc.url}/instances/{orthanc_id}/file"
            with urllib.request.urlopen(url, timeout=30) as rsp:
                ds = pydicom.dcmread(io.BytesIO(rsp.read()))
            assert node.sent[str(ds.SOPInstanceUID)] == content_key(ds)
    finally:
        node.catalog.dispose()


def test_a_stopped_server_is_retried_then_dead_lettered_after_the_bound(tmp_path, orthanc):
    node = outbox_node(tmp_path, [_stow(orthanc)], delivery={"max_attempts": 2})
    orthanc.stop()
    try:
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        rows = _rows(node.catalog)
        assert [r[:3] for r in rows] == [("PENDING", 1, "no answer")] * 3
        _make_due(node.catalog)
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        rows = _rows(node.catalog)
        assert [r[:2] for r in rows] == [("DEAD", 2)] * 3
        assert all(r[3] and r[3].startswith("gave up after 2 attempts") for r in rows)
    finally:
        node.catalog.dispose()


def test_a_server_that_returns_is_sent_what_waited(tmp_path, orthanc):
    node = outbox_node(tmp_path, [_stow(orthanc)])
    orthanc.stop()
    try:
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        orthanc.start()
        _make_due(node.catalog)
        assert deliver_due(node.settings, node.catalog, node.store) == 3
        assert [r[:3] for r in _rows(node.catalog)] == [("SENT", 2, "0x0000")] * 3
        assert len(orthanc.get("/instances")) == 3
    finally:
        node.catalog.dispose()


def test_a_request_refused_as_a_whole_is_dead_lettered_at_once(tmp_path, orthanc):
    """HTTP 404 (no DICOMweb service at that URL) is not retried: the address is wrong."""
    wrong = _stow(orthanc, url=f"{orthanc.url}/no-such-service")
    node = outbox_node(tmp_path, [wrong])
    try:
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        rows = _rows(node.catalog)
        assert [r[:3] for r in rows] == [("DEAD", 1, "0xC000")] * 3
        assert {r[3] for r in rows} == {"STOW-RS answered HTTP 404"}
        assert orthanc.get("/instances") == []
    finally:
        node.catalog.dispose()
