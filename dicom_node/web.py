"""Read-only status page and Prometheus metrics of the node (Starlette, served by uvicorn).

``cspine serve`` starts it in a thread when ``web.enabled`` is set (off by default):

* ``GET /metrics``: Prometheus text exposition (``prometheus_client``), counted from the
  catalog at each scrape, so the receivers and the worker (other processes) are seen;
* ``GET /``: one HTML page with the studies, jobs, outbox and recent failures.

Who may read them (Starlette's authentication middleware; anything else is 401):

* by default every request needs ``Authorization: Bearer <web.token>``, over plain
  HTTP, or over HTTPS when ``web.tls_cert`` and ``web.tls_key`` are set;
* with ``web.tls_ca`` uvicorn's TLS handshake requires a client certificate signed by
  that CA (``ssl_cert_reqs=CERT_REQUIRED``): a client without one, or with one from
  another CA, never gets an HTTP answer. The certificate is then the credential; a
  ``web.token`` that is also set is required on top of it.

TLS is uvicorn's own (``ssl_certfile``, ``ssl_keyfile``, ``ssl_ca_certs``,
``ssl_cert_reqs``), with the TLS 1.2 suites of :data:`dicom_node.tls.BCP195_CIPHERS`.
The page shows catalog ids, states, counts and times; the Study Instance UID, study
date and description appear only with ``web.show_identifiers``. The catalog holds no
patient name or ID, so none can appear.
"""

from __future__ import annotations

import datetime as dt
import hmac
import html
import logging
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    SimpleUser,
    requires,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from config.settings import WebSettings
from dicom_node.result import JobResult
from dicom_node.tls import BCP195_CIPHERS
from dicom_node.uids import device_uid
from storage import Catalog
from storage.catalog import age_seconds, list_studies
from storage.jobs import latest_job, status_report
from storage.metrics import catalog_metrics
from storage.models import JobState, OutboxState, StudyState

LOGGER = logging.getLogger(__name__)

STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds (seconds) of the stage-timing histogram buckets."""
PAGE_STUDIES = 50
"""Studies listed on the page (most recently received first)."""


def _by_state(name: str, doc: str, states: Iterable[Any], counts: Mapping[Any, int]) -> Metric:
    """A gauge with one sample per state of an enum (0 where the catalog has none)."""
    gauge = GaugeMetricFamily(name, doc, labels=["state"])
    for state in states:
        gauge.add_metric([state.value], counts.get(state, 0))
    return gauge


class CatalogCollector(Collector):
    """Prometheus collector that counts the catalog at every scrape.

    Parameters
    ----------
    catalog
        The node's catalog (shared by its receivers and worker).
    results_limit
        Finished jobs whose stage timings feed the histogram (newest first).
    """

    def __init__(self, catalog: Catalog, results_limit: int = 1000) -> None:
        self.catalog = catalog
        self.results_limit = results_limit

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families, counted in one read of the catalog."""
        m = catalog_metrics(self.catalog, self.results_limit)
        yield GaugeMetricFamily(
            "cspine_instances_stored", "Instances stored in the catalog.", value=m.instances
        )
        refused = GaugeMetricFamily(
            "cspine_instances_refused",
            "Instances refused on receipt, by DIMSE status, among the refusals the catalog keeps.",
            labels=["status"],
        )
        for status, n in sorted(m.refusals.items()):
            refused.add_metric([f"0x{status:04X}"], n)
        yield refused
        yield _by_state("cspine_studies", "Studies by reception state.", StudyState, m.studies)
        yield GaugeMetricFamily(
            "cspine_studies_processed",
            "Studies with a finished job (DONE or NOT_PROCESSED).",
            value=m.studies_processed,
        )
        yield _by_state("cspine_jobs", "Jobs by state.", JobState, m.jobs)
        yield _by_state(
            "cspine_outbox_deliveries", "Outbox deliveries by state.", OutboxState, m.outbox
        )
        yield GaugeMetricFamily(
            "cspine_outbox_depth",
            "Deliveries waiting to be sent (PENDING).",
            value=m.outbox.get(OutboxState.PENDING, 0),
        )
        yield GaugeMetricFamily(
            "cspine_outbox_oldest_age_seconds",
            "Seconds since the job behind the oldest waiting delivery finished (0: none).",
            value=0.0 if m.oldest_pending_since is None else age_seconds(m.oldest_pending_since),
        )
        yield GaugeMetricFamily(
            "cspine_dead_letters",
            "Deliveries given up (DEAD); `cspine resend` queues them again.",
            value=m.outbox.get(OutboxState.DEAD, 0),
        )
        results = [_result(text) for text in m.results]
        yield _stage_histogram([r for r in results if r is not None])
        yield _model_info(next((r for r in results if r is not None and r.models), None))


def _result(text: str) -> JobResult | None:
    try:
        return JobResult.from_json(text)
    except (ValueError, TypeError, KeyError):
        return None


def _stage_histogram(results: Iterable[JobResult]) -> HistogramMetricFamily:
    samples: dict[str, list[float]] = {}
    for result in results:
        for stage, seconds in result.timings.items():
            samples.setdefault(stage, []).append(seconds)
    family = HistogramMetricFamily(
        "cspine_stage_seconds",
        "Seconds per job stage, over the newest finished jobs.",
        labels=["stage"],
    )
    for stage, values in sorted(samples.items()):
        buckets = [(f"{b:g}", sum(1 for v in values if v <= b)) for b in STAGE_BUCKETS]
        buckets.append(("+Inf", len(values)))
        family.add_metric([stage], buckets, sum_value=sum(values))
    return family


def _model_info(result: JobResult | None) -> InfoMetricFamily:
    family = InfoMetricFamily(
        "cspine_model",
        "Model packages of the newest finished job (Device UID as its outputs carry it).",
        labels=["name"],
    )
    for model in result.models if result is not None else ():
        try:
            uid = device_uid(model.name, model.version, model.sha256)
        except ValueError:
            uid = ""
        family.add_metric(
            [model.name],
            {"version": model.version, "sha256": model.sha256[:16], "device_uid": uid},
        )
    return family


class BearerToken(AuthenticationBackend):
    """Starlette authentication backend: ``Authorization: Bearer <token>`` or nothing."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("The status page needs a non-empty token.")
        self._token = token.encode()

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        """Accept the configured token; refuse (401) a missing or different one."""
        scheme, _, value = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), self._token
        ):
            raise AuthenticationError("a valid bearer token is required")
        return AuthCredentials(["authenticated"]), SimpleUser("operator")


class ClientCertificate(AuthenticationBackend):
    """Starlette authentication backend for ``web.tls_ca``: the TLS handshake's client
    certificate, and the bearer token as well when one is configured.

    uvicorn (``ssl_cert_reqs=CERT_REQUIRED``) completes no handshake without a
    certificate signed by the CA, so every request that reaches the application over
    HTTPS carried one. A request over plain HTTP (a server started without TLS) is
    refused, so this backend never lets a request in on the configuration alone.

    Parameters
    ----------
    token
        The bearer token also required, or ``""`` for the certificate alone.
    """

    def __init__(self, token: str = "") -> None:
        self._token = BearerToken(token) if token else None

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        """Accept an HTTPS request (and its token, if configured); refuse (401) the rest."""
        if conn.scope.get("scheme") != "https":
            raise AuthenticationError("a TLS client certificate is required")
        if self._token is not None:
            return await self._token.authenticate(conn)
        return AuthCredentials(["authenticated"]), SimpleUser("client-certificate")


def authentication_backend(settings: WebSettings) -> AuthenticationBackend:
    """The backend for ``settings``: :class:`ClientCertificate` with ``web.tls_ca``,
    else :class:`BearerToken`.

    Raises
    ------
    ValueError
        When neither a token nor client certificates are configured.
    """
    if settings.client_certificate:
        return ClientCertificate(settings.token)
    return BearerToken(settings.token)


def uvicorn_tls_options(settings: WebSettings) -> dict[str, Any]:
    """uvicorn's TLS options for ``settings`` (empty: plain HTTP).

    Returns
    -------
    dict
        ``ssl_certfile``, ``ssl_keyfile`` and ``ssl_ciphers`` with ``web.tls_cert``;
        with ``web.tls_ca`` also ``ssl_ca_certs`` and ``ssl_cert_reqs=CERT_REQUIRED``.
    """
    if not settings.tls:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": settings.tls_cert,
        "ssl_keyfile": settings.tls_key,
        "ssl_ciphers": BCP195_CIPHERS,
    }
    if settings.client_certificate:
        options |= {"ssl_ca_certs": settings.tls_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def _unauthorized(_conn: HTTPConnection, exc: Exception) -> Response:
    return PlainTextResponse(
        f"401 Unauthorized: {exc}\n", status_code=401, headers={"WWW-Authenticate": "Bearer"}
    )


def _cell(value: Any) -> str:
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def _row(*values: Any) -> str:
    return "<tr>" + "".join(_cell(v) for v in values) + "</tr>"


def _table(title: str, head: Iterable[str], rows: list[str], empty: str) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(rows) if rows else f'<tr><td class="empty" colspan="99">{empty}</td></tr>'
    return f"<h2>{html.escape(title)}</h2><table><tr>{header}</tr>{body}</table>"


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _failure(reason: str | None, study_id: int, show: bool) -> str:
    """A failed job's reason: ``"TypeName: text"``, whose text may quote header values;
    only the exception type unless identifiers are shown."""
    if reason is None or show:
        return reason or ""
    return f"{reason.split(':', 1)[0]} (details: cspine show {study_id})"


def render_page(catalog: Catalog, settings: WebSettings) -> str:
    """The status page's HTML: counts, studies, running and failed jobs, outbox, refusals.

    Only catalog ids, states, counts, times, AE titles and the node's own messages
    appear; the Study Instance UID, study date and description, and the text of a failed
    job's exception (it may quote header values), only with ``settings.show_identifiers``.
    """
    report = status_report(catalog, recent=20)
    oldest = catalog_metrics(catalog, results_limit=0).oldest_pending_since
    studies = list_studies(catalog, PAGE_STUDIES)
    show = settings.show_identifiers
    study_rows = []
    for s in studies:
        job = latest_job(catalog, s.id)
        extra = (s.study_instance_uid, s.study_date, s.study_description) if show else ()
        study_rows.append(
            _row(
                s.id,
                s.state.value,
                "flagged" if s.flagged else "",
                s.series_count,
                s.instance_count,
                _when(s.last_received_at),
                f"{job.id} {job.state.value}" if job else "",
                *extra,
            )
        )
    study_head = ["id", "state", "flag", "series", "instances", "last received (UTC)", "job"]
    if show:
        study_head += ["Study Instance UID", "study date", "description"]
    counts = "".join(
        f'<span class="count">{html.escape(state.value)} {report.job_counts.get(state, 0)}</span>'
        for state in JobState
    )
    outbox = "".join(
        f'<span class="count">{html.escape(state.value)} {report.outbox_counts.get(state, 0)}'
        "</span>"
        for state in OutboxState
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='30'><title>cspine-node status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>cspine-node status</h1>",
        f"<p class='note'>Read only. Generated {_when(dt.datetime.now(dt.UTC))} UTC."
        f"{'' if show else ' Patient-related identifiers hidden (web.show_identifiers).'}</p>",
        f"<p><b>Jobs</b> {counts}</p><p><b>Outbox</b> {outbox}"
        + ("" if oldest is None else f" oldest waiting {age_seconds(oldest):.0f} s")
        + "</p>",
        _table("Studies", study_head, study_rows, "no study"),
        _table(
            "Running jobs",
            ["job", "study", "worker", "attempts", "heartbeat (UTC)"],
            [
                _row(j.id, j.study_id, j.worker, j.attempts, _when(j.heartbeat_at))
                for j in report.running
            ],
            "none",
        ),
        _table(
            "Failed jobs",
            ["job", "study", "reason", "updated (UTC)"],
            [
                _row(j.id, j.study_id, _failure(j.reason, j.study_id, show), _when(j.updated_at))
                for j in report.failed_jobs
            ],
            "none",
        ),
        _table(
            "Dead letters",
            ["delivery", "output", "destination", "attempts", "last status", "last error"],
            [
                _row(d.id, d.kind, d.destination.name, d.attempts, d.last_status, d.last_error)
                for d in report.dead_deliveries
            ],
            "none",
        ),
        _table(
            "Held deliveries (destination left the configuration)",
            ["delivery", "output", "destination", "reason"],
            [_row(d.id, d.kind, d.destination.name, d.last_error) for d in report.held_deliveries],
            "none",
        ),
        _table(
            "Recent refusals on receipt",
            ["at (UTC)", "calling AE", "status", "reason"],
            [
                _row(_when(r.refused_at), r.calling_ae, f"0x{r.status:04X}", r.reason)
                for r in report.refusals
            ],
            "none",
        ),
        "</body></html>",
    ]
    return "".join(parts)


_CSS = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left;font-size:.9em}"
    "th{background:#eee}.empty{color:#888}.note{color:#666;font-size:.85em}"
    ".count{display:inline-block;margin-right:1em}"
)


def build_app(catalog: Catalog, settings: WebSettings) -> Starlette:
    """The Starlette application: ``/`` (status page) and ``/metrics``, both behind
    :func:`authentication_backend` (the token, or the TLS client certificate).

    Parameters
    ----------
    catalog
        The node's catalog, read through :mod:`storage`'s record functions.
    settings
        ``[web]`` settings (token, client certificates, identifiers shown or not).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(catalog))

    @requires("authenticated", status_code=401)
    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @requires("authenticated", status_code=401)
    def page(request: Request) -> Response:
        return HTMLResponse(render_page(catalog, settings))

    return Starlette(
        routes=[Route("/", page), Route("/metrics", metrics)],
        middleware=[
            Middleware(
                AuthenticationMiddleware,
                backend=authentication_backend(settings),
                on_error=_unauthorized,
            )
        ],
    )


class WebServer:
    """uvicorn serving :func:`build_app` in a background thread of ``cspine serve``.

    Plain HTTP, or HTTPS with uvicorn's TLS options (:func:`uvicorn_tls_options`).
    Proxy headers are ignored: ``X-Forwarded-Proto`` cannot make a request look like
    HTTPS.
    """

    def __init__(self, catalog: Catalog, settings: WebSettings) -> None:
        config = uvicorn.Config(
            build_app(catalog, settings),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            **uvicorn_tls_options(settings),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start serving; return once the socket listens.

        Raises
        ------
        RuntimeError
            When uvicorn did not start within ``timeout_s`` (e.g. the port is taken).
        """
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"status page did not start on {self.server.config.host}:"
                    f"{self.server.config.port}"
                )
            time.sleep(0.02)
        config = self.server.config
        LOGGER.info(
            "status page listening host=%s port=%d scheme=%s client_certificate=%s",
            config.host,
            config.port,
            "https" if config.is_ssl else "http",
            "required" if config.ssl_cert_reqs == ssl.CERT_REQUIRED else "no",
        )

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(10)


__all__ = [
    "BearerToken",
    "CatalogCollector",
    "ClientCertificate",
    "WebServer",
    "authentication_backend",
    "build_app",
    "render_page",
    "uvicorn_tls_options",
]
