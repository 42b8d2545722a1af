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


def _deliver_once(node) -> set[tuple[str, str, int, str | None]]:
    """One delivery round of the node's three outputs; ``(destination, state, attempts,
    last status)`` of every outbox row afterwards."""
    assert deliver_due(node.settings, node.catalog, node.store) == 3
    with node.catalog.read() as s:
        items = s.scalars(select(OutboxItem).order_by(OutboxItem.id))
        return {(i.destination.name, i.state.value, i.attempts, i.last_status) for i in items}


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


class _AuthOrthanc(Orthanc):
    """Orthanc with HTTP basic authentication (its REST calls here authenticate too)."""

    user: tuple[str, str] = ("node", "")

    def _request(self, method: str, path: str, body: bytes | None, ctype: str):
        import base64
        import json

        req = urllib.request.Request(self.url + path, data=body, method=method)
        token = base64.b64encode(":".join(self.user).encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=60) as rsp:
            data = rsp.read()
        return json.loads(data) if data else None


def test_basic_auth_sends_with_good_credentials_and_retries_refused_ones(tmp_path):
    from tests.interop.ohif import dicomweb_plugin

    try:
        plugin = dicomweb_plugin()
    except ToolMissing as exc:
        pytest.skip(str(exc))
    password = "stow-password"
    server = _AuthOrthanc(
        tmp_path / "orthanc",
        extra={
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "AuthenticationEnabled": True,
            "RegisteredUsers": {"node": password},
        },
    )
    server.user = ("node", password)
    server.start()
    good = {"kind": "stow", "url": f"{server.url}/dicom-web", "username": "node"}
    dests = [
        {**good, "name": "good", "password": password},
        {**good, "name": "refused", "password": "wrong"},
        {**good, "name": "anonymous", "username": None},
    ]
    try:
        node = outbox_node(tmp_path, dests)
        got = _deliver_once(node)
        assert got == {
            ("good", "SENT", 1, "0x0000"),
            ("refused", "PENDING", 1, "HTTP 401"),  # retried: the credentials may be fixed
            ("anonymous", "PENDING", 1, "HTTP 401"),
        }
        assert len(server.get("/instances")) == 3
        node.catalog.dispose()
    finally:
        server.stop()


class TlsProxy:
    """A TLS-terminating reverse proxy on a free loopback port (as a site puts nginx in
    front of its PACS): it decrypts with ``cert``/``key`` and forwards to ``port``."""

    def __init__(self, cert: Path, key: Path, port: int) -> None:
        import socket
        import ssl
        import threading

        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.target = port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import socket
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                tls = self.ctx.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()  # a client that does not trust us hangs up in the handshake
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(tls, upstream), daemon=True).start()

    @staticmethod
    def _pump(tls, upstream) -> None:
        """Both directions in one thread (an SSL socket is not safe to read and write
        from two threads at once)."""
        import select

        try:
            while True:
                ready = [tls] if tls.pending() else select.select([tls, upstream], [], [])[0]
                for src, dst in ((tls, upstream), (upstream, tls)):
                    if src in ready:
                        data = src.recv(65536)
                        if not data:
                            return
                        dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (tls, upstream):
                sock.close()

    def stop(self) -> None:
        self.sock.close()


def test_https_is_sent_only_to_a_server_whose_certificate_ca_file_trusts(tmp_path, orthanc):
    from tests.pki import make_ca, make_leaf

    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "site-ca")
    make_ca(pki, "rogue-ca")
    make_leaf(pki, "pacs", "site-ca")
    proxy = TlsProxy(pki / "pacs.crt", pki / "pacs.key", orthanc.http_port)
    url = f"https://127.0.0.1:{proxy.port}/dicom-web"
    dests = [
        {"name": "trusted", "kind": "stow", "url": url, "ca_file": str(pki / "site-ca.crt")},
        {"name": "untrusted", "kind": "stow", "url": url, "ca_file": str(pki / "rogue-ca.crt")},
        {"name": "system-cas", "kind": "stow", "url": url},
    ]
    try:
        node = outbox_node(tmp_path, dests)
        got = _deliver_once(node)
        assert got == {
            ("trusted", "SENT", 1, "0x0000"),
            ("untrusted", "PENDING", 1, "no answer"),  # never sent to a server not trusted
            ("system-cas", "PENDING", 1, "no answer"),
        }
        assert len(orthanc.get("/instances")) == 3
        node.catalog.dispose()
    finally:
        proxy.stop()


def test_the_seg_sr_and_summary_of_a_real_job_are_stowed_and_read_back(tmp_path, orthanc):
    """The worker's own outputs (a stand-in pipeline, the real writers) go by STOW-RS."""
    from ai.synthetic import StudySpec, generate_study, write_study
    from config import load_settings
    from dicom_node import destinations as destination_rows
    from dicom_node.receive import Receiver, open_node_storage
    from dicom_node.worker import Worker
    from tests.dicom_node.conftest import make_settings
    from tests.dicom_node.test_jobs import TruthPipeline, _complete

    study = generate_study(11, StudySpec.small(fracture_rate=1.0))
    base = make_settings(tmp_path).model_dump(mode="json")
    settings = load_settings(overrides={**base, "destinations": [_stow(orthanc)]}, environ={})
    catalog, store = open_node_storage(settings)
    try:
        destination_rows.sync(settings, catalog)
        receiver = Receiver(settings, catalog, store)
        for path in write_study(study, tmp_path / "study"):
            assert receiver.accept(path, consume=False).status == 0
        _complete(catalog)
        worker = Worker(settings, catalog, store, pipeline_factory=lambda: TruthPipeline(study))
        assert worker.run_once()
        assert deliver_due(settings, catalog, store) == 3
        source = pydicom.dcmread(next((tmp_path / "study").rglob("*.dcm")))
        qido = DICOMwebClient(f"{orthanc.url}/dicom-web")
        found = qido.search_for_instances(study_instance_uid=source.StudyInstanceUID)
        classes = sorted(str(pydicom.Dataset.from_json(d).SOPClassUID) for d in found)
        assert classes == [
            "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
            "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (summary)
            "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        ]
    finally:
        catalog.dispose()
