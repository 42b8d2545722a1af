"""Notifications of findings: a positive study (or, when configured, one not processed)
queues a signed JSON body through the outbox to a webhook, here a real loopback HTTP
receiver that checks the HMAC-SHA256 signature the way a site's receiver would."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
from sqlalchemy import select, update

from ai.synthetic import StudySpec, generate_study, write_series, write_study
from config import load_settings
from dicom_node import destinations as destination_rows
from dicom_node.delivery import deliver_due
from dicom_node.receive import Receiver, open_node_storage
from dicom_node.worker import Worker
from storage.models import Job, JobState, OutboxItem
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.test_jobs import TruthPipeline, _complete

SECRET = "loopback-webhook-secret"


class WebhookReceiver:
    """``http.server`` on a free loopback port that accepts a POST only when its
    ``X-Cspine-Signature`` is the HMAC-SHA256 of ``<timestamp>.<body>`` with ``secret``
    and its timestamp is within 5 minutes; ``fail_next`` answers 503 that many times."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.accepted: list[dict] = []
        self.raw: list[bytes] = []
        self.answers: list[int] = []
        self.fail_next = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                code = owner.judge(self.headers, body)
                owner.answers.append(code)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def judge(self, headers, body: bytes) -> int:
        stamp = headers.get("X-Cspine-Timestamp", "")
        given = headers.get("X-Cspine-Signature", "")
        want = (
            "sha256="
            + hmac.new(self.secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        )
        if not stamp.isdigit() or abs(time.time() - int(stamp)) > 300:
            return 401
        if not hmac.compare_digest(given, want):
            return 401
        if self.fail_next:
            self.fail_next -= 1
            return 503
        self.raw.append(body)
        self.accepted.append(json.loads(body))
        return 204

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(SECRET).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def fractured():
    return generate_study(11, StudySpec.small(fracture_rate=1.0))


def _node(tmp_path, study, hook_url, secret=SECRET, files=None, **sections):
    base = make_settings(tmp_path).model_dump(mode="json")
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    hook = {"name": "triage", "kind": "webhook", "url": hook_url, "secret": secret}
    settings = load_settings(overrides={**base, "destinations": [hook]}, environ={})
    catalog, store = open_node_storage(settings)
    destination_rows.sync(settings, catalog)
    receiver = Receiver(settings, catalog, store)
    for path in files if files is not None else write_study(study, tmp_path / "study"):
        assert receiver.accept(path, consume=False).status == 0
    _complete(catalog)
    worker = Worker(settings, catalog, store, pipeline_factory=lambda: TruthPipeline(study))
    assert worker.run_once()
    return settings, catalog, store


def _rows(catalog) -> list[tuple[str, int, str | None]]:
    with catalog.read() as s:
        items = s.scalars(select(OutboxItem).order_by(OutboxItem.id))
        return [(i.state.value, i.attempts, i.last_status) for i in items]


def _make_due(catalog) -> None:
    catalog.write(
        lambda s: s.execute(update(OutboxItem).values(next_attempt_at=dt.datetime(2000, 1, 1)))
    )


def test_a_positive_study_is_notified_signed_and_without_patient_identifiers(
    tmp_path, fractured, receiver
):
    settings, catalog, store = _node(tmp_path, fractured, receiver.url)
    try:
        with catalog.read() as s:
            job = s.scalars(select(Job)).one()
            assert job.state is JobState.DONE
            assert sorted(o.kind for o in job.outputs) == ["notification", "seg", "sr", "summary"]
            job_id, study_id = job.id, job.study_id
        assert deliver_due(settings, catalog, store) == 1
        assert _rows(catalog) == [("SENT", 1, "HTTP 204")]
        (body,) = receiver.accepted
        assert body["schema"] == "cspine.notification/1"
        assert (body["job_id"], body["study_id"]) == (job_id, study_id)
        assert (body["verdict"], body["patient_probability"]) == ("POSITIVE", 0.9)
        assert body["threshold"] == settings.models.fracture_threshold
        assert [v["label"] for v in body["vertebrae"]] == [f"C{i}" for i in range(1, 8)]
        for v in body["vertebrae"]:  # TruthPipeline: 0.9 on a fractured vertebra, 0.1 else
            if v["assessed"]:
                assert v["probability"] == (
                    0.9 if fractured.vertebra_fractured[v["label"]] else 0.1
                )
            else:
                assert v["probability"] is None
        assert any(v["assessed"] for v in body["vertebrae"])
        assert body["models"] == [{"name": "stand-in", "version": "0", "sha256": "0" * 64}]
        assert "identifiers" not in body
        source = pydicom.dcmread(next((tmp_path / "study").rglob("*.dcm")))
        for value in (source.PatientID, str(source.PatientName), source.StudyInstanceUID):
            assert value.encode() not in receiver.raw[0]
        assert deliver_due(settings, catalog, store) == 0  # sent once
    finally:
        catalog.dispose()


def test_a_receiver_that_fails_once_gets_the_notification_on_the_retry(
    tmp_path, fractured, receiver
):
    receiver.fail_next = 1
    settings, catalog, store = _node(tmp_path, fractured, receiver.url)
    try:
        assert deliver_due(settings, catalog, store) == 0
        assert _rows(catalog) == [("PENDING", 1, "HTTP 503")]
        assert deliver_due(settings, catalog, store) == 0  # not due yet: the backoff
        _make_due(catalog)
        assert deliver_due(settings, catalog, store) == 1
        assert _rows(catalog) == [("SENT", 2, "HTTP 204")]
        assert receiver.answers == [503, 204] and len(receiver.accepted) == 1
    finally:
        catalog.dispose()


def test_a_bad_signature_is_refused_retried_and_dead_lettered_after_the_bound(
    tmp_path, fractured, receiver
):
    settings, catalog, store = _node(
        tmp_path,
        fractured,
        receiver.url,
        secret="not-the-receivers-secret",
        delivery={"max_attempts": 2},
    )
    try:
        assert deliver_due(settings, catalog, store) == 0
        assert _rows(catalog) == [("PENDING", 1, "HTTP 401")]
        _make_due(catalog)
        assert deliver_due(settings, catalog, store) == 0
        with catalog.read() as s:
            (item,) = s.scalars(select(OutboxItem))
            assert (item.state.value, item.attempts) == ("DEAD", 2)
            assert item.last_error == "gave up after 2 attempts; last: webhook answered HTTP 401"
        assert receiver.answers == [401, 401] and receiver.accepted == []
    finally:
        catalog.dispose()


def test_below_the_threshold_nothing_is_queued(tmp_path, fractured, receiver):
    settings, catalog, store = _node(
        tmp_path, fractured, receiver.url, notifications={"threshold": 0.95}
    )
    try:
        with catalog.read() as s:
            job = s.scalars(select(Job)).one()
            assert sorted(o.kind for o in job.outputs) == ["seg", "sr", "summary"]
        assert deliver_due(settings, catalog, store) == 0
        assert _rows(catalog) == [] and receiver.answers == []
    finally:
        catalog.dispose()


def test_identifiers_go_into_the_body_only_when_a_setting_allows_it_and_never_into_logs(
    tmp_path, fractured, receiver, caplog
):
    caplog.set_level(logging.DEBUG)
    settings, catalog, store = _node(
        tmp_path, fractured, receiver.url, notifications={"include_identifiers": True}
    )
    try:
        assert deliver_due(settings, catalog, store) == 1
        (body,) = receiver.accepted
        source = pydicom.dcmread(next((tmp_path / "study").rglob("*.dcm")))
        assert body["identifiers"]["PatientID"] == source.PatientID
        assert body["identifiers"]["StudyInstanceUID"] == source.StudyInstanceUID
        assert set(body["identifiers"]) == {"StudyInstanceUID", "AccessionNumber", "PatientID"}
        assert "notification queued" in caplog.text
        assert source.PatientID not in caplog.text
        assert str(source.PatientName) not in caplog.text
    finally:
        catalog.dispose()


def test_a_study_not_processed_is_notified_when_configured(tmp_path, receiver):
    study = generate_study(13, StudySpec.small(extra_series=True))
    scout = next(e for e in study.extra_series if e.name == "scout")
    files = write_series(study, tmp_path / "scout", series=scout)
    settings, catalog, store = _node(
        tmp_path,
        study,
        receiver.url,
        files=files,
        notifications={"on_not_processed": True},
    )
    try:
        with catalog.read() as s:
            job = s.scalars(select(Job)).one()
            assert job.state is JobState.NOT_PROCESSED
        assert deliver_due(settings, catalog, store) == 1
        (body,) = receiver.accepted
        assert body["verdict"] == "NOT_PROCESSED"
        assert "no eligible series" in body["reason"]
        assert body["patient_probability"] is None
    finally:
        catalog.dispose()


def test_an_https_webhook_is_posted_only_when_ca_file_trusts_its_certificate(
    tmp_path, fractured, receiver
):
    from tests.pki import make_ca, make_leaf
    from tests.reliability.test_stow_destination import TlsProxy

    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "site-ca")
    make_ca(pki, "rogue-ca")
    make_leaf(pki, "hook", "site-ca")
    proxy = TlsProxy(pki / "hook.crt", pki / "hook.key", receiver.server.server_address[1])
    url = f"https://127.0.0.1:{proxy.port}/hook"
    try:
        for name, ca, sent in (("rogue", "rogue-ca", 0), ("site", "site-ca", 1)):
            folder = tmp_path / name
            settings, catalog, store = _node(folder, fractured, url)
            # the same webhook, with its ca_file (only the configuration holds it)
            hook = {
                **settings.destinations[0].model_dump(mode="json"),
                "ca_file": str(pki / f"{ca}.crt"),
            }
            hook["secret"] = SECRET
            settings = load_settings(
                overrides={**settings.model_dump(mode="json"), "destinations": [hook]}, environ={}
            )
            try:
                assert deliver_due(settings, catalog, store) == sent
                expected = ("SENT", 1, "HTTP 204") if sent else ("PENDING", 1, "no answer")
                assert _rows(catalog) == [expected]
            finally:
                catalog.dispose()
        assert len(receiver.accepted) == 1
    finally:
        proxy.stop()
