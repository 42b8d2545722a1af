"""The Storage SCP: presentation contexts, handlers and the serving node.

Handlers follow pynetdicom's style, ``handle_<event>(event, ...)``; they never
raise and never run inference. Received data is streamed to a spool file on the
store's filesystem (pynetdicom's chunked receive) and renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

from config import Settings, check_bind_safety
from dicom_node.receive import Receiver
from dicom_node.validate import (
    ACCEPTED_TRANSFER_SYNTAXES,
    CANNOT_UNDERSTAND,
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
)

LOGGER = logging.getLogger(__name__)


def storage_sop_classes(settings: Settings) -> list[str]:
    """SOP classes accepted for storage: CT, Enhanced CT, plus configured extras."""
    return [CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, *settings.node.extra_storage_sop_classes]


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always success."""
    return 0x0000


def handle_store(event: evt.Event, receiver: Receiver) -> Dataset | int:
    """C-STORE: validate, store durably, record, then answer. Never raises."""
    try:
        req = event.request
        outcome = receiver.accept(
            event.dataset_path,
            affected_sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
            affected_sop_class_uid=str(req.AffectedSOPClassUID or ""),
            calling_ae=event.assoc.requestor.ae_title,
        )
    except Exception:  # the receive path itself never raises; this is a last guard
        LOGGER.exception("C-STORE handler failed")
        return CANNOT_UNDERSTAND
    status = Dataset()
    status.Status = outcome.status
    if outcome.status != 0x0000 and outcome.reason:
        status.ErrorComment = outcome.reason[:64]
    return status


def handle_requested(event: evt.Event, settings: Settings) -> None:
    """A-ASSOCIATE-RQ: apply the peer allow-list (calling AE, optional IP or network)."""
    peers = settings.node.peers
    if not peers:
        return
    requestor = event.assoc.requestor
    ae_title = str(requestor.primitive.calling_ae_title).strip()
    if not any(peer.matches(ae_title, requestor.address) for peer in peers):
        LOGGER.warning(
            "association rejected reason=calling-ae-not-allowed calling_ae=%s address=%s",
            ae_title,
            requestor.address,
        )
        # (1, 1, 3): rejected-permanent, service-user, calling AE title not recognised
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        event.assoc.is_rejected = True
        event.assoc.kill()


def handle_conn_open(event: evt.Event, started: dict[int, float]) -> None:
    """New TCP connection: set TCP_NODELAY and remember when it started."""
    with contextlib.suppress(Exception):
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started[id(event.assoc)] = time.monotonic()
    LOGGER.info("connection opened address=%s", event.address[0])


def handle_conn_close(event: evt.Event, started: dict[int, float]) -> None:
    """Connection closed: drop a half-received spool file left by an aborted transfer."""
    started.pop(id(event.assoc), None)
    with contextlib.suppress(Exception):
        message = event.assoc.dimse.message
        spool = getattr(message, "_data_set_file", None)
        if spool is not None:
            spool.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool.name)
            LOGGER.info("partial transfer discarded address=%s", event.address[0])


def handle_assoc_event(event: evt.Event) -> None:
    """Log association lifecycle with AE titles and peer addresses only."""
    LOGGER.info(
        "association %s calling_ae=%s address=%s",
        event.event.name.replace("EVT_", "").lower(),
        str(event.assoc.requestor.ae_title).strip(),
        event.assoc.requestor.address,
    )


def build_ae(settings: Settings) -> AE:
    """Build the Application Entity with its contexts, limits and timeouts."""
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    ae.add_supported_context(Verification)
    for sop_class in storage_sop_classes(settings):
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.require_called_aet = True
    return ae


class StorageNode:
    """A running SCP with its completion checker and housekeeping.

    Parameters
    ----------
    settings
        Loaded settings.
    receiver
        The receive path (catalog and store).
    on_complete
        Called with a study id when a study becomes COMPLETE.
    clock
        Monotonic clock for completion (tests inject a fake one).
    """

    def __init__(
        self,
        settings: Settings,
        receiver: Receiver,
        *,
        on_complete: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from dicom_node.completion import CompletionChecker

        self.settings = settings
        self.receiver = receiver
        self.ae = build_ae(settings)
        self.checker = CompletionChecker(
            receiver.catalog, settings.completion.stable_seconds, clock, on_complete
        )
        self._started: dict[int, float] = {}
        self._server: Any = None
        self._scheduler: Any = None
        self._lock = threading.Lock()

    def start(
        self,
        *,
        block: bool = False,
        ssl_context: Any = None,
        extra_jobs: list[tuple[Callable[[], Any], float, str]] = (),  # type: ignore[assignment]
    ) -> None:
        """Bind and serve; with ``block=False`` return once listening.

        ``extra_jobs`` are ``(function, interval_s, name)`` run by the same scheduler.
        """
        from apscheduler.schedulers.background import BackgroundScheduler

        check_bind_safety(self.settings)
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom spools into tempfile's folder: keep it on the store's filesystem
        tempfile.tempdir = str(self.receiver.store.tmp_dir)
        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.receiver]),
            (evt.EVT_REQUESTED, handle_requested, [self.settings]),
            (evt.EVT_CONN_OPEN, handle_conn_open, [self._started]),
            (evt.EVT_CONN_CLOSE, handle_conn_close, [self._started]),
            (evt.EVT_ABORTED, handle_assoc_event),
            (evt.EVT_ACCEPTED, handle_assoc_event),
            (evt.EVT_RELEASED, handle_assoc_event),
        ]
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        self._scheduler.add_job(
            self._safe(self.checker.tick),
            "interval",
            seconds=self.settings.completion.check_interval_seconds,
            id="completion",
        )
        self._scheduler.add_job(self._safe(self._watchdog), "interval", seconds=5, id="watchdog")
        for fn, interval, name in extra_jobs:
            self._scheduler.add_job(self._safe(fn), "interval", seconds=interval, id=name)
        self._scheduler.start()
        node = self.settings.node
        LOGGER.info("listening ae_title=%s host=%s port=%d", node.ae_title, node.host, node.port)
        self._server = self.ae.start_server(
            (node.host, node.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        if block:
            try:
                while True:
                    time.sleep(3600)
            finally:
                self.stop()

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self._server.server_address[1])

    @staticmethod
    def _safe(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception:
                LOGGER.exception("housekeeping job failed")

        return run

    def _watchdog(self) -> None:
        """Abort associations older than the maximum association duration."""
        limit = self.settings.node.max_association_seconds
        now = time.monotonic()
        if self._server is None:
            return
        for assoc in list(self._server.active_associations):
            began = self._started.get(id(assoc))
            if began is not None and now - began > limit:
                LOGGER.warning(
                    "association aborted reason=max-duration address=%s", assoc.requestor.address
                )
                assoc.abort()

    def stop(self) -> None:
        """Stop serving and housekeeping."""
        with self._lock:
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=False)
                self._scheduler = None
            if self._server is not None:
                self._server.shutdown()
                self._server = None
