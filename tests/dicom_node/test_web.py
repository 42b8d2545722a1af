"""Status page and Prometheus metrics: a real uvicorn server on loopback, read over HTTP.

The catalog is filled by the node's own code: a synthetic study taken in by the
receiver, a job run by the worker with a stand-in pipeline (outputs queued for a
destination that is down), and a refused file. ``cspine serve`` with the page enabled
runs as a subprocess in the last test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from config import ConfigError, load_settings
from config.settings import WebSettings
from dicom_node.uids import device_uid
from dicom_node.web import WebServer, render_page
from dicom_node.worker import Worker
from tests.conftest import free_port
from tests.dicom_node.proc import Server, cspine
from tests.dicom_node.test_jobs import TruthPipeline, _complete, _node, study  # noqa: F401
from tests.helpers import SECRET_ACCESSION, SECRET_ID, SECRET_NAME, write_series

TOKEN = "test-token-0123456789abcdef"


def _get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, dict, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value`` of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def served(tmp_path, study):  # noqa: F811
    """A catalog with one processed study, 3 waiting deliveries and a refusal, served."""
    down = free_port()  # nothing listens there: deliveries stay PENDING
    settings, catalog, _store, worker = _node(
        tmp_path, study, [{"ae_title": "PACS", "host": "127.0.0.1", "port": down}]
    )
    _complete(catalog)
    assert worker.run_once()
    bad = tmp_path / "not-dicom.dcm"
    bad.write_bytes(b"this is not DICOM")
    assert worker.settings is settings
    from dicom_node.receive import Receiver

    refused = Receiver(settings, catalog, _store).accept(bad, consume=False, calling_ae="SCANNER")
    assert refused.status == 0xC210
    source = pydicom.dcmread(next((tmp_path / "study" / "2_bone").iterdir()))

    def serve(**web) -> int:
        port = free_port()
        server = WebServer(catalog, WebSettings(enabled=True, port=port, token=TOKEN, **web))
        server.start()
        servers.append(server)
        return port

    servers: list[WebServer] = []
    yield {
        "serve": serve,
        "source": source,
        "files": len(list((tmp_path / "study").rglob("*.dcm"))),
    }
    for server in servers:
        server.stop()
    catalog.dispose()


def test_metrics_scraped_over_loopback_parse_and_count_the_catalog(served):
    port = served["serve"]()
    status, headers, text = _get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = _samples(text)
    assert samples[("cspine_instances_stored", ())] == served["files"]
    assert samples[("cspine_instances_refused", (("status", "0xC210"),))] == 1
    assert samples[("cspine_studies", (("state", "COMPLETE"),))] == 1
    assert samples[("cspine_studies", (("state", "RECEIVING"),))] == 0
    assert samples[("cspine_studies_processed", ())] == 1
    assert samples[("cspine_jobs", (("state", "DONE"),))] == 1
    assert samples[("cspine_jobs", (("state", "FAILED"),))] == 0
    assert samples[("cspine_outbox_depth", ())] == 3
    assert samples[("cspine_outbox_deliveries", (("state", "PENDING"),))] == 3
    assert samples[("cspine_dead_letters", ())] == 0
    assert samples[("cspine_outbox_oldest_age_seconds", ())] >= 0
    # stage timings: one finished job, so every stage's histogram counts 1
    stages = {
        dict(labels)["stage"] for (name, labels) in samples if name == "cspine_stage_seconds_count"
    }
    assert {"select", "load", "write"} <= stages
    for stage in stages:
        assert samples[("cspine_stage_seconds_count", (("stage", stage),))] == 1
        assert samples[("cspine_stage_seconds_bucket", (("le", "+Inf"), ("stage", stage)))] == 1
    model = {
        dict(labels)["name"]: dict(labels)
        for (name, labels) in samples
        if name == "cspine_model_info"
    }
    assert model["stand-in"]["version"] == "0"
    assert model["stand-in"]["device_uid"] == device_uid("stand-in", "0", "0" * 64)


def test_outbox_age_grows_while_a_delivery_waits(served):
    port = served["serve"]()
    first = _samples(_get(port, "/metrics")[2])[("cspine_outbox_oldest_age_seconds", ())]
    time.sleep(1.1)
    second = _samples(_get(port, "/metrics")[2])[("cspine_outbox_oldest_age_seconds", ())]
    assert second >= first + 1.0


@pytest.mark.parametrize("path", ["/", "/metrics"])
@pytest.mark.parametrize(
    "token",
    [None, "wrong-token-0123456789abcdef", TOKEN[:-1], ""],
    ids=["none", "wrong", "prefix", "empty"],
)
def test_a_request_without_the_token_is_refused(served, path, token):
    port = served["serve"]()
    status, headers, body = _get(port, path, token=token)
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert "cspine" not in body  # nothing of the page or the metrics
    assert _get(port, path)[0] == 200


def test_page_lists_the_study_without_patient_identifiers(served):
    port = served["serve"]()
    status, headers, page = _get(port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    source = served["source"]
    assert "<h2>Studies</h2>" in page
    assert "<td>1</td><td>COMPLETE</td>" in page  # catalog id and state
    assert "DONE" in page and "0xC210" in page and "SCANNER" in page
    assert "PENDING 3" in page and "oldest waiting" in page
    for identifier in (
        str(source.PatientName),
        str(source.PatientID),
        source.StudyInstanceUID,
        str(source.get("AccessionNumber", "")) or "no accession",
        str(source.get("PatientBirthDate", "")) or "no birth date",
    ):
        assert identifier not in page
    assert "Patient-related identifiers hidden" in page


def test_page_shows_the_study_uid_only_when_configured(served):
    port = served["serve"](show_identifiers=True)
    page = _get(port, "/")[2]
    assert served["source"].StudyInstanceUID in page
    assert str(served["source"].PatientName) not in page  # never in the catalog


def test_failed_job_shows_only_its_exception_type_without_identifiers(tmp_path, study):  # noqa: F811
    class Raising:
        def run(self, vol):
            raise RuntimeError(f"header says {study.patient_name}")

    settings, catalog, store, _ = _node(tmp_path, study)
    _complete(catalog)
    assert Worker(settings, catalog, store, pipeline_factory=Raising).run_once()
    try:
        page = render_page(catalog, WebSettings())
        assert "<h2>Failed jobs</h2>" in page
        assert "RuntimeError (details: cspine show 1)" in page
        assert study.patient_name not in page
        shown = render_page(catalog, WebSettings(show_identifiers=True))
        assert f"RuntimeError: header says {study.patient_name}" in shown
    finally:
        catalog.dispose()


@pytest.mark.parametrize(
    ("web", "message"),
    [
        ({"enabled": True}, "web.token of at least 16"),
        ({"enabled": True, "token": "short"}, "web.token of at least 16"),
        ({"enabled": True, "token": TOKEN, "host": "0.0.0.0"}, "web.allow_remote"),
    ],
)
def test_unsafe_web_settings_are_refused(web, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides={"web": web}, environ={})
    assert load_settings(environ={}).web.enabled is False  # off by default
    assert load_settings(environ={}).web.host == "127.0.0.1"


@pytest.mark.slow
def test_cspine_serve_serves_the_page_and_metrics_when_enabled(tmp_path: Path):
    data_dir, port, web_port = tmp_path / "var", free_port(), free_port()
    env = {
        "CSPINE_WEB__ENABLED": "true",
        "CSPINE_WEB__PORT": str(web_port),
        "CSPINE_WEB__TOKEN": TOKEN,
    }
    series = write_series(tmp_path / "study", 4)
    server = Server(data_dir, port, "--no-worker", "--stable-seconds", "1", env=env).start()
    try:
        sent = cspine("send", str(series[0].parent), "--to", f"CSPINE@127.0.0.1:{port}")
        assert sent.returncode == 0, sent.stderr
        assert _get(web_port, "/metrics", token=None)[0] == 401
        deadline = time.monotonic() + 30
        samples: dict = {}
        while time.monotonic() < deadline:
            samples = _samples(_get(web_port, "/metrics")[2])
            if samples[("cspine_studies", (("state", "COMPLETE"),))] == 1:
                break
            time.sleep(0.5)
        assert samples[("cspine_studies", (("state", "COMPLETE"),))] == 1
        assert samples[("cspine_instances_stored", ())] == 4
        page = _get(web_port, "/")[2]
        assert "<td>1</td><td>COMPLETE</td>" in page
        for secret in (SECRET_NAME, SECRET_ID, SECRET_ACCESSION):
            assert secret not in page
    finally:
        server.stop()
    log = server.log()
    assert f"status page listening host=127.0.0.1 port={web_port}" in log
    assert TOKEN not in log


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium not found (make system-tools installs it: apt-get install -y chromium)"
    return found


def test_page_renders_in_headless_chromium(served, tmp_path):
    """The served page, fetched with the token, rendered by headless Chromium.

    Chromium's command line cannot send an Authorization header, so the HTML the server
    returned is saved and opened from a file (the page has no external resource).
    ``CSPINE_SCREENSHOTS=docs/images`` also writes ``status_page.png`` there.
    """
    port = served["serve"]()
    status, _, page = _get(port, "/")
    assert status == 200
    html_path = tmp_path / "status.html"
    html_path.write_text(page)
    shot = tmp_path / "status_page.png"
    done = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,900",
            f"--screenshot={shot}",
            html_path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (900, 1280, 3)
    # the table headers' grey (#eee) and dark text are drawn: not a blank page
    assert (np.all(image == 0xEE, axis=2)).sum() > 1000
    assert (image.max(axis=2) < 80).sum() > 1000
    target = os.environ.get("CSPINE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(target) / "status_page.png")
