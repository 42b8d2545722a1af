"""Status page and Prometheus metrics: a real uvicorn server on loopback, read over HTTP.

The catalog is filled by the node's own code: a synthetic study taken in by the
receiver, a job run by the worker with a stand-in pipeline (outputs queued for a
destination that is down), and a refused file. ``cspine serve`` with the page enabled
runs as a subprocess. The HTTPS tests serve with uvicorn's TLS (the certificates of
``tests/pki.py``): a client certificate signed by ``web.tls_ca`` instead of the token,
refused handshakes without one or with one from another CA.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.authentication import AuthenticationError
from starlette.requests import HTTPConnection

from config import ConfigError, load_settings
from config.settings import WebSettings
from dicom_node.uids import device_uid
from dicom_node.web import ClientCertificate, WebServer, render_page, uvicorn_tls_options
from dicom_node.worker import Worker
from tests.conftest import free_port
from tests.dicom_node.proc import Server, cspine
from tests.dicom_node.test_jobs import TruthPipeline, _complete, _node, study  # noqa: F401
from tests.helpers import SECRET_ACCESSION, SECRET_ID, SECRET_NAME, write_series
from tests.pki import make_pki

TOKEN = "test-token-0123456789abcdef"


def _get(
    port: int, path: str, token: str | None = TOKEN, tls: ssl.SSLContext | None = None
) -> tuple[int, dict, str]:
    """``(status, headers, body)`` of a GET, over HTTPS when ``tls`` is given.

    Raises ``OSError`` (``ssl.SSLError``, ``URLError``, ``ConnectionError``) when no HTTP
    answer comes, e.g. a refused TLS handshake.
    """
    scheme = "http" if tls is None else "https"
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20, context=tls) as response:
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
        server = WebServer(
            catalog, WebSettings(**{"enabled": True, "port": port, "token": TOKEN, **web})
        )
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


# ---------------------------------------------------------------------------
# HTTPS and client certificates (uvicorn's TLS; certificates of tests/pki.py)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """site-ca signs node, pacs and scanner; rogue-ca signs intruder."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_tls(pki: Path, client_ca: str | None = "site-ca") -> dict[str, str]:
    """``[web]`` TLS settings: the node's certificate, and a client CA if given."""
    tls = {"tls_cert": str(pki / "node.crt"), "tls_key": str(pki / "node.key")}
    if client_ca is not None:
        tls["tls_ca"] = str(pki / f"{client_ca}.crt")
    return tls


def _client_tls(pki: Path, cert: str | None) -> ssl.SSLContext:
    """A client that trusts site-ca (and checks the server's name), with ``cert`` if given."""
    ctx = ssl.create_default_context(cafile=str(pki / "site-ca.crt"))
    if cert is not None:
        ctx.load_cert_chain(pki / f"{cert}.crt", pki / f"{cert}.key")
    return ctx


@pytest.mark.parametrize("path", ["/", "/metrics"])
def test_a_client_certificate_from_the_ca_is_let_in_without_a_token(served, pki, path):
    port = served["serve"](token="", **_server_tls(pki))
    status, headers, body = _get(port, path, token=None, tls=_client_tls(pki, "scanner"))
    assert status == 200
    if path == "/metrics":
        assert _samples(body)[("cspine_instances_stored", ())] == served["files"]
    else:
        assert "<h2>Studies</h2>" in body and headers["content-type"].startswith("text/html")


def _raw_get(port: int, path: str, ctx: ssl.SSLContext) -> bytes:
    """The first bytes answered to a GET over a raw TLS socket (``b""``: none, the
    handshake or the connection failed)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            return tls.recv(1024)
    except (ssl.SSLError, ConnectionError):
        return b""


@pytest.mark.parametrize("path", ["/", "/metrics"])
@pytest.mark.parametrize("cert", [None, "intruder"], ids=["no-certificate", "other-ca"])
def test_the_handshake_is_refused_without_a_certificate_from_the_ca(served, pki, path, cert):
    port = served["serve"](token="", **_server_tls(pki))
    with pytest.raises(OSError) as refused:  # no HTTP answer at all, not even a 401
        _get(port, path, token=TOKEN, tls=_client_tls(pki, cert))
    assert not isinstance(refused.value, urllib.error.HTTPError)
    # the same over a raw TLS socket: not one byte of HTTP comes back
    assert _raw_get(port, path, _client_tls(pki, cert)) == b""
    assert _raw_get(port, path, _client_tls(pki, "scanner")).startswith(b"HTTP/1.1 200")
    assert _get(port, path, token=None, tls=_client_tls(pki, "scanner"))[0] == 200


def test_a_client_certificate_and_a_token_are_both_required_when_both_are_set(served, pki):
    port = served["serve"](**_server_tls(pki))  # token=TOKEN as well
    scanner = _client_tls(pki, "scanner")
    status, headers, body = _get(port, "/metrics", token=None, tls=scanner)
    assert status == 401 and headers["www-authenticate"] == "Bearer" and "cspine" not in body
    assert _get(port, "/metrics", token="wrong-token-0123456789abcdef", tls=scanner)[0] == 401
    assert _get(port, "/metrics", tls=scanner)[0] == 200
    with pytest.raises(OSError):  # the token does not stand in for the certificate
        _get(port, "/metrics", tls=_client_tls(pki, None))


def test_https_without_a_client_ca_still_needs_the_token(served, pki):
    port = served["serve"](**_server_tls(pki, client_ca=None))
    anonymous = _client_tls(pki, None)
    assert _get(port, "/", token=None, tls=anonymous)[0] == 401
    status, _, page = _get(port, "/", tls=anonymous)
    assert status == 200 and "<h2>Studies</h2>" in page
    with pytest.raises(OSError):  # plain HTTP to the HTTPS port gets no page
        _get(port, "/", token=TOKEN)


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_https_refuses_protocols_below_tls12(served, pki, version):
    port = served["serve"](token="", **_server_tls(pki))
    ctx = _client_tls(pki, "scanner")
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client really offer the old protocol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        pytest.raises(ssl.SSLError) as info,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.do_handshake()
    # the server refused (asyncio's TLS may close without sending its protocol_version
    # alert), not the client: the same client offering TLS 1.2 gets in
    assert info.value.reason in {"TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING"}
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _raw_get(port, "/metrics", ctx).startswith(b"HTTP/1.1 200")


def test_uvicorn_gets_its_own_tls_options(pki):
    assert uvicorn_tls_options(WebSettings(token=TOKEN)) == {}
    server_only = uvicorn_tls_options(WebSettings(**_server_tls(pki, client_ca=None)))
    assert server_only["ssl_certfile"] == str(pki / "node.crt")
    assert server_only["ssl_keyfile"] == str(pki / "node.key")
    assert "ssl_cert_reqs" not in server_only and "ssl_ca_certs" not in server_only
    mutual = uvicorn_tls_options(WebSettings(**_server_tls(pki)))
    assert mutual["ssl_ca_certs"] == str(pki / "site-ca.crt")
    assert mutual["ssl_cert_reqs"] == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    "headers", [[], [(b"x-forwarded-proto", b"https")]], ids=["plain", "forwarded-proto"]
)
def test_the_client_certificate_backend_refuses_plain_http(headers):
    conn = HTTPConnection({"type": "http", "scheme": "http", "headers": headers, "path": "/"})
    with pytest.raises(AuthenticationError, match="client certificate"):
        asyncio.run(ClientCertificate().authenticate(conn))
    https = HTTPConnection({"type": "http", "scheme": "https", "headers": [], "path": "/"})
    assert asyncio.run(ClientCertificate().authenticate(https))[0].scopes == ["authenticated"]
    with pytest.raises(AuthenticationError, match="bearer token"):
        asyncio.run(ClientCertificate(TOKEN).authenticate(https))


def test_web_tls_settings_are_checked_when_loaded(pki, tmp_path):
    def load(**web):
        return load_settings(overrides={"web": web}, environ={}).web

    node_crt, node_key, ca = str(pki / "node.crt"), str(pki / "node.key"), str(pki / "site-ca.crt")
    on = {"enabled": True, "token": TOKEN}
    with pytest.raises(ConfigError, match=r"web\.tls_cert needs web\.tls_key"):
        load(tls_cert=node_crt)  # checked even while the page is off
    with pytest.raises(ConfigError, match=r"web\.tls_key needs web\.tls_cert"):
        load(**on, tls_key=node_key)
    with pytest.raises(ConfigError, match=r"web\.tls_ca \(client certificates\) needs HTTPS"):
        load(**on, tls_ca=ca)
    missing = str(tmp_path / "absent.crt")
    with pytest.raises(ConfigError, match=r"readable PEM files.*web\.tls_cert .*absent\.crt"):
        load(**on, tls_cert=missing, tls_key=node_key)
    with pytest.raises(ConfigError, match=r"readable PEM files.*web\.tls_ca .*absent\.crt"):
        load(**on, tls_cert=node_crt, tls_key=node_key, tls_ca=missing)
    with pytest.raises(ConfigError, match=r"cannot load web\.tls_cert"):
        load(**on, tls_cert=node_crt, tls_key=str(pki / "scanner.key"))  # not its key
    with pytest.raises(ConfigError, match=r"cannot load web\.tls_ca"):
        load(**on, tls_cert=node_crt, tls_key=node_key, tls_ca=node_key)  # no certificate
    # client certificates: the token may be empty; a token that is set is still checked
    mutual = {"enabled": True, "tls_cert": node_crt, "tls_key": node_key, "tls_ca": ca}
    assert load(**mutual).client_certificate
    with pytest.raises(ConfigError, match=r"web\.token of at least 16"):
        load(**mutual, token="short")
    with pytest.raises(ConfigError, match=r"web\.token of at least 16"):
        load(enabled=True, tls_cert=node_crt, tls_key=node_key)  # HTTPS alone: token needed
    # off, with the files not there: only the pairs are checked
    assert not load(tls_cert=missing, tls_key=missing).enabled


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
