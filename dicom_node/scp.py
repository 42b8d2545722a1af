"""The Storage SCP: presentation contexts, handlers and the serving node.

Handlers follow pynetdicom's style, ``handle_<event>(event, ...)``; they never
raise and never run inference. Received data is streamed to a spool file on the
store's filesystem (pynetdicom's chunked receive) and renamed into place.

Every accepted connection is wrapped by :class:`GuardedServer` before pynetdicom
reads from it (see :class:`ConnectionLimits`): a per-read idle timeout, a deadline
for the whole association, a cap on every declared PDU length and on the data set
bytes of one message, and a cap on open connections. With ``node.tls.enabled`` the
listener speaks DICOM TLS only; the handshake runs in the association's own thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pynetdicom.sop_class as sop_classes
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import ServiceUser
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # set at import
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from config import Settings, check_bind_safety
from dicom_node import store_rq, store_rsp
from dicom_node.assoc_count import AssociationCount
from dicom_node.receive import Receiver
from dicom_node.tls import describe, server_context
from dicom_node.validate import (
    ACCEPTED_TRANSFER_SYNTAXES,
    CANNOT_UNDERSTAND,
    CT_STORAGE_SOP_CLASSES,
    SUCCESS,
)

LOGGER = logging.getLogger(__name__)


def storage_sop_classes(settings: Settings) -> list[str]:
    """SOP classes accepted for storage: CT, Enhanced CT, plus configured extras."""
    return [*CT_STORAGE_SOP_CLASSES, *settings.node.extra_storage_sop_classes]


def register_storage_class(uid: str) -> None:
    """Make pynetdicom route C-STOREs of ``uid`` (e.g. a private class) to the Storage service.

    pynetdicom accepts a presentation context for any UID, but aborts a C-STORE whose
    SOP class it does not know ("No supported service class"). Known classes are left as
    they are.
    """
    from pynetdicom import sop_class as known
    from pynetdicom.service_class import StorageServiceClass

    if known.uid_to_service_class(uid) is StorageServiceClass:
        return
    keyword = "CspineExtraStorage" + uid.replace(".", "_")
    known.register_uid(uid, keyword, StorageServiceClass)


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always success."""
    return SUCCESS


def handle_store(event: evt.Event, receiver: Receiver) -> Dataset | int:
    """C-STORE: validate, store durably, record, then answer. Never raises."""
    try:
        req = cast(C_STORE, event.request)
        path = event.dataset_path
        sop_instance = str(req.AffectedSOPInstanceUID or "")
        sop_class = str(req.AffectedSOPClassUID or "")
        calling_ae = event.assoc.requestor.ae_title
    except Exception:  # pynetdicom could not give the request's parts; a last guard
        LOGGER.exception("C-STORE handler failed")
        return CANNOT_UNDERSTAND
    return store_answer(receiver, path, sop_instance, sop_class, calling_ae)


def store_answer(
    receiver: Receiver, path: Path, sop_instance_uid: str, sop_class_uid: str, calling_ae: str
) -> Dataset | int:
    """The status of one C-STORE whose data set is the spool file ``path``. Never raises.

    A status with a reason is a data set with an Error Comment (64 characters at most).
    """
    try:
        outcome = receiver.accept(
            path,
            affected_sop_instance_uid=sop_instance_uid,
            affected_sop_class_uid=sop_class_uid,
            calling_ae=calling_ae,
        )
    except Exception:  # the receive path itself never raises; this is a last guard
        LOGGER.exception("C-STORE handler failed")
        return CANNOT_UNDERSTAND
    if outcome.status == SUCCESS or not outcome.reason:
        return outcome.status
    status = Dataset()
    status.Status = outcome.status
    status.ErrorComment = outcome.reason[:64]
    return status


class InlineStore:
    """Plain C-STORE requests served on the thread that reads the association.

    pynetdicom hands every complete message from the thread that reads the socket (the
    DUL's) to the association's own thread through a queue, turns its command set into
    a primitive (validating each UID with a regular expression), builds an event for
    the handler, and hands the response back through a second queue. For a C-STORE
    request that :func:`dicom_node.store_rq.plain_store` accepts, this object does the
    handler's work where the last fragment was read: :func:`store_answer`, then a
    success written straight to the socket (:func:`dicom_node.store_rsp.send_store_success`)
    or any other status through pynetdicom's ``send_msg``. The sender waits for the
    answer before it sends more (one operation at a time is negotiated), so nothing is
    read meanwhile that it would have to wait for.

    Used only when the association's handlers allow it (:func:`inline_store_for`).
    """

    def __init__(self, assoc: Any, receiver: Receiver) -> None:
        self.assoc = assoc
        self.receiver = receiver
        self._storage: dict[str, bool] = {}

    def takes(self, request: store_rq.StoreRequest) -> bool:
        """Whether pynetdicom would give this request to the Storage service, as it is."""
        assoc = self.assoc
        if assoc._sent_release or not assoc.is_established:
            return False
        if assoc.acceptor.accepted_common_extended:  # pynetdicom maps such SOP classes
            return False
        if _config.ENFORCE_UID_CONFORMANCE:  # pynetdicom's stricter check of each UID
            return False
        storage = self._storage.get(request.sop_class_uid)
        if storage is None:
            storage = _config.UNRESTRICTED_STORAGE_SERVICE or (
                sop_classes.uid_to_service_class(request.sop_class_uid) is StorageServiceClass
            )
            self._storage[request.sop_class_uid] = storage
        return storage

    def __call__(self, request: store_rq.StoreRequest, path: str) -> None:
        """Answer ``request``; its data set is the closed spool file ``path``."""
        assoc = self.assoc
        try:
            answer = store_answer(
                self.receiver,
                Path(path),
                request.sop_instance_uid,
                request.sop_class_uid,
                assoc.requestor.ae_title,
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # not consumed (refused): as pynetdicom deletes it
        if not assoc.is_established:  # aborted meanwhile: nothing to answer
            return
        if answer == SUCCESS and store_rsp.send_store_success(
            assoc.dimse,
            request.context_id,
            request.message_id,
            request.sop_class_uid,
            request.sop_instance_uid,
        ):
            return
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = request.message_id
        rsp.AffectedSOPClassUID = request.sop_class_uid
        rsp.AffectedSOPInstanceUID = request.sop_instance_uid
        rsp = StorageServiceClass(assoc).validate_status(answer, rsp)
        assoc.dimse.send_msg(rsp, request.context_id)


_OBSERVED_EVENTS = (
    evt.EVT_DATA_RECV,
    evt.EVT_PDU_RECV,
    evt.EVT_FSM_TRANSITION,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_PDU_SENT,
)
"""Notifications the inline path does not raise: with any of them bound it stays off."""


def inline_store_for(assoc: Any) -> InlineStore | None:
    """An :class:`InlineStore` for ``assoc``, or ``None`` when its handlers rule it out.

    It needs :func:`handle_store` bound to ``EVT_C_STORE`` with a :class:`Receiver`, and
    no handler on the notifications it skips (:data:`_OBSERVED_EVENTS`: pynetdicom's
    own logging handlers, bound when its logger is at DEBUG, are such handlers).
    """
    handler, args = assoc.get_handlers(evt.EVT_C_STORE)
    if handler is not handle_store or not args or not isinstance(args[0], Receiver):
        return None
    if any(assoc.get_handlers(event) for event in _OBSERVED_EVENTS):
        return None
    return InlineStore(assoc, args[0])


def _event_value(event: evt.Event, name: str) -> Any:
    """An attribute pynetdicom sets on an event from the event's own keywords (untyped)."""
    return getattr(event, name)


def _calling_ae(requestor: ServiceUser) -> str:
    """The calling AE title of an association request, stripped ("" before the request)."""
    primitive = requestor.primitive
    return "" if primitive is None else str(primitive.calling_ae_title).strip()


def _reject(event: evt.Event, result: int, source: int, reason: int, why: str) -> None:
    requestor = event.assoc.requestor
    LOGGER.warning(
        "association rejected reason=%s rj=(%d,%d,%d) calling_ae=%s address=%s",
        why,
        result,
        source,
        reason,
        _calling_ae(requestor),
        requestor.address,
    )
    event.assoc.acse.send_reject(result, source, reason)
    event.assoc.is_rejected = True
    event.assoc.kill()


def handle_requested(
    event: evt.Event, settings: Settings, count: AssociationCount | None = None
) -> None:
    """A-ASSOCIATE-RQ: apply the peer allow-list and the user-identity requirement.

    * calling AE title not in ``node.peers``, or from outside its ``host`` network:
      A-ASSOCIATE-RJ (1, 1, 3), rejected-permanent, service-user, calling AE title
      not recognised;
    * ``node.user_identity.required`` and no User Identity item: (1, 1, 1),
      rejected-permanent, service-user, no reason given;
    * with several receiver processes (``count``), more than ``node.max_associations``
      connections in all of them, this one included: (2, 3, 2), rejected-transient,
      service-provider (presentation), local limit exceeded.

    The called AE title (1, 1, 7), a refused identity (2, 2, 1) and, in one process,
    the association limit (2, 3, 2) are checked afterwards by pynetdicom's negotiation.
    """
    node = settings.node
    requestor = event.assoc.requestor
    ae_title = _calling_ae(requestor)
    if node.peers and not any(peer.matches(ae_title, requestor.address) for peer in node.peers):
        # (1, 1, 3): rejected-permanent, service-user, calling AE title not recognised
        _reject(event, 0x01, 0x01, 0x03, "calling-ae-not-allowed")
        return
    identity = node.user_identity
    if identity.enabled and identity.required and requestor.user_identity is None:
        _reject(event, 0x01, 0x01, 0x01, "user-identity-missing")
        return
    if count is not None:
        # this process's slot recounted from its live connections first
        here = sum(
            1
            for a in event.assoc.ae.active_associations
            if getattr(a, "_cspine_counted", None) is not None
        )
        if count.over_limit(here):
            _reject(event, 0x02, 0x03, 0x02, "too-many-associations")


def handle_user_id(event: evt.Event, settings: Settings) -> tuple[bool, bytes | None]:
    """User Identity Negotiation: username and passcode (type 2), over TLS only.

    Returns ``(False, None)``, which pynetdicom answers with A-ASSOCIATE-RJ (2, 2, 1),
    for a plain-TCP association, another identity type, an unknown user or a wrong
    passcode. Passcodes are never logged.
    """
    address = event.assoc.requestor.address
    transport = event.assoc.dul.socket
    if transport is None or not isinstance(transport.socket, ssl.SSLSocket):
        LOGGER.warning("user identity refused reason=not-tls address=%s", address)
        return False, None
    id_type = _event_value(event, "user_id_type")
    if id_type != 2:
        LOGGER.warning(
            "user identity refused reason=unsupported-type type=%s address=%s",
            id_type,
            address,
        )
        return False, None
    username = bytes(_event_value(event, "primary_field") or b"").decode("utf-8", "replace")
    account = settings.node.user_identity.find(username)
    secret = bytes(_event_value(event, "secondary_field") or b"")
    ok = account is not None and account.verify(secret)
    LOGGER.log(
        logging.INFO if ok else logging.WARNING,
        "user identity %s username=%s address=%s",
        "accepted" if ok else "refused reason=bad-credentials",
        username[:64],
        address,
    )
    return ok, None


class FastAssociationSocket(AssociationSocket):
    """pynetdicom's acceptor socket, reading whole PDUs and waking on work, not on a timer.

    pynetdicom reads a PDU in 4 KiB ``recv`` calls, and its DUL thread polls the socket
    with a zero timeout and sleeps 1 ms whenever nothing happened, so every PDU and every
    response can wait up to a millisecond. Here :meth:`recv` fills the PDU with
    ``recv_into`` calls as large as the kernel allows, and :attr:`ready` blocks in
    ``select`` on the socket and on a wake-up pipe that is written whenever a primitive
    is queued for sending (the DUL's ``to_provider_queue``), for at most
    :attr:`WAIT_S`; the DUL's own sleep is set to zero. The association thread's poll for
    a decoded message waits on the message queue for up to :attr:`MESSAGE_WAIT_S`, and
    is woken at once by whatever the DUL hands the association (a release request, an
    abort). An idle association thus costs a wake-up per :attr:`WAIT_S` on its reading
    thread and one per :attr:`MESSAGE_WAIT_S` on its own, instead of one per
    millisecond on each.

    When the association's handlers allow it (:func:`inline_store_for`), a P-DATA-TF PDU
    read while the association is established (state Sta6) with no event pending goes
    straight to the DIMSE provider (:meth:`read_pdu`), and plain C-STORE requests are
    answered on this thread (:class:`InlineStore`). Every other PDU, and every PDU in
    any other state, goes through pynetdicom's decoder and state machine as before.

    Installed on each accepted connection by :meth:`adopt`, before its threads start.
    """

    WAIT_S = 0.005
    MESSAGE_WAIT_S = 0.05
    _wake_r: socket.socket | None = None
    _wake_w: socket.socket | None = None
    _unread: bytes = b""
    """Bytes read ahead by :meth:`read_pdu` and given back to pynetdicom's reader."""
    inline: InlineStore | None = None
    """The association's inline C-STORE service, when its handlers allow one."""

    @classmethod
    def adopt(cls, assoc: Any) -> None:
        """Turn ``assoc``'s socket into a :class:`FastAssociationSocket` (once)."""
        sock = assoc.dul.socket
        if sock is None or isinstance(sock, cls) or type(sock) is not AssociationSocket:
            return
        sock.__class__ = cls
        fast = cast(FastAssociationSocket, sock)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        fast._wake_r, fast._wake_w = wake_r, wake_w
        outgoing = assoc.dul.to_provider_queue
        put = outgoing.put

        def put_and_wake(item: Any, *args: Any, **kwargs: Any) -> None:
            put(item, *args, **kwargs)
            with contextlib.suppress(OSError):
                wake_w.send(b"\0")

        outgoing.put = put_and_wake
        assoc.dul._run_loop_delay = 0.0
        # The association's own loop sleeps 1 ms and then polls for a decoded message:
        # its poll waits on the message queue for up to MESSAGE_WAIT_S instead, and
        # whatever the DUL hands the association (a release request, an abort) also
        # puts a notice there, which ends the wait at once.
        dimse = assoc.dimse
        messages = dimse.msg_queue
        to_user = assoc.dul.to_user_queue
        put_to_user = to_user.put

        def put_and_notify(item: Any, *args: Any, **kwargs: Any) -> None:
            put_to_user(item, *args, **kwargs)
            messages.put((None, None))

        to_user.put = put_and_notify

        def get_msg(block: bool = False) -> tuple[Any, Any]:
            if not block:
                try:
                    return messages.get(block=True, timeout=cls.MESSAGE_WAIT_S)
                except queue.Empty:
                    return None, None
            deadline = (
                None if dimse.dimse_timeout is None else time.monotonic() + dimse.dimse_timeout
            )
            while True:  # a caller waiting for a message: notices are not one
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = messages.get(block=True, timeout=left)
                except queue.Empty:
                    return None, None
                if item[1] is not None:
                    return item

        dimse.get_msg = get_msg
        store_rsp.install(dimse)  # a plain C-STORE success: no pydicom round trip
        fast.inline = inline_store_for(assoc)
        store_rq.install(dimse, fast.inline)  # data sets spooled with plain writes
        if fast.inline is not None:
            read_any = assoc.dul._read_pdu_data
            assoc.dul._read_pdu_data = lambda: fast.read_pdu(read_any)

    def close_wakeup(self) -> None:
        """Close the wake-up pipe (the connection is gone)."""
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()

    @property
    def ready(self) -> bool:
        """Whether a PDU can be read; waits up to :attr:`WAIT_S` for data or work."""
        if self._unread:
            return True
        sock = self.socket
        if sock is None or not self._is_connected or self._wake_r is None:
            time.sleep(0.001)  # the DUL's loop has no other pacing now
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        if not self.assoc.dul.to_provider_queue.empty():
            return False  # let the DUL send first
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], self.WAIT_S)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom: transport closed
            return False
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only when the peer closed the connection)."""
        buf = bytearray(nr_bytes)
        got = 0
        if self._unread:
            got = min(nr_bytes, len(self._unread))
            buf[:got] = self._unread[:got]
            self._unread = self._unread[got:]
        sock = self.socket
        assert sock is not None
        view = memoryview(buf)
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                del view
                return buf[:got]
            got += n
        return buf

    def read_pdu(self, read_any: Callable[[], None]) -> None:
        """Read PDUs: P-DATA in state Sta6 straight to DIMSE, the rest to pynetdicom.

        While a message is part-way in and its next PDU is already readable (the sender
        streams a data set's PDUs back to back) that PDU is read at once, without a turn
        of pynetdicom's reactor loop; the turn comes once the message is complete, or
        nothing is readable, or a PDU goes to pynetdicom.

        Parameters
        ----------
        read_any
            pynetdicom's own ``DULServiceProvider._read_pdu_data``: it is given every PDU
            this does not take, its bytes put back in front of the stream first.
        """
        while self._read_one(read_any) and self._more_of_a_message():
            pass

    def _read_one(self, read_any: Callable[[], None]) -> bool:
        """Read one PDU; whether it was a P-DATA taken here."""
        dul = self.assoc.dul
        try:
            head = self.recv(6)
            take = (
                len(head) == 6
                and head[0] == 0x04
                and dul.state_machine.current_state == "Sta6"
                and dul.event_queue.empty()
            )
            length = int.from_bytes(head[2:6], "big") if take else 0
            body = self.recv(length) if take else bytearray()
        except (OSError, TimeoutError) as exc:  # as pynetdicom: the connection is gone
            LOGGER.info("connection closed within a PDU error=%s", type(exc).__name__)
            dul.event_queue.put("Evt17")
            return False
        if take and len(body) == length:
            pdvs = split_pdvs(body)
            if pdvs is not None:
                self.assoc.dimse.receive_primitive(cast(Any, ReceivedValues(pdvs)))
                return True
        self._unread = bytes(head) + bytes(body)
        read_any()
        return False

    def _more_of_a_message(self) -> bool:
        """Whether a message is part-way in, its next bytes readable now, nothing to send."""
        sock = self.socket
        dul = self.assoc.dul
        if sock is None or self.assoc.dimse.message is None or dul._kill_thread:
            return False
        if not dul.to_provider_queue.empty():
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)


class ReceivedValues:
    """What the DIMSE provider reads of a P-DATA indication: its values, as views.

    pynetdicom's ``P_DATA`` primitive insists on ``bytes``; the values here are views
    of the PDU as read, which :func:`dicom_node.store_rq.decode_msg` takes as they are.
    """

    __slots__ = ("presentation_data_value_list",)

    def __init__(self, values: list[tuple[int, memoryview]]) -> None:
        self.presentation_data_value_list = values


def split_pdvs(body: bytearray) -> list[tuple[int, memoryview]] | None:
    """The presentation data values of a P-DATA-TF PDU's body, or ``None`` if malformed.

    Each item (PS3.8 9.3.5.1) is a 4-byte length, a presentation context ID and the
    value: a message control header and a fragment. ``None`` for an item shorter than
    its context ID and control header, an item running past the PDU, or no item at
    all: pynetdicom's decoder then judges the PDU.
    """
    view = memoryview(body)
    values: list[tuple[int, memoryview]] = []
    i, n = 0, len(view)
    while i < n:
        if n - i < 6:
            return None
        length = int.from_bytes(view[i : i + 4], "big")
        if length < 2 or length > n - i - 4:
            return None
        values.append((view[i + 4], view[i + 5 : i + 4 + length]))
        i += 4 + length
    return values or None


class ConnectionCounts:
    """Connections opened and closed so far (the close handler has finished its cleanup)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opened = 0
        self.closed = 0

    def add(self, opened: int = 0, closed: int = 0) -> None:
        with self._lock:
            self.opened += opened
            self.closed += closed

    @property
    def open(self) -> int:
        """Connections whose close the node has not handled yet."""
        with self._lock:
            return self.opened - self.closed


def handle_conn_open(
    event: evt.Event,
    started: dict[int, float],
    limits: ConnectionLimits | None = None,
    counts: ConnectionCounts | None = None,
    associations: AssociationCount | None = None,
) -> None:
    """New TCP connection: TLS handshake (in this association's thread), TCP_NODELAY.

    A failed handshake (no or untrusted client certificate, TLS below 1.2, plain
    TCP on the TLS port) is logged and the connection shut down. With several
    receiver processes the connection is counted in ``associations`` until it closes.
    """
    started[id(event.assoc)] = time.monotonic()
    if counts is not None:
        counts.add(opened=1)
    if associations is not None:
        associations.opened()
        event.assoc._cspine_counted = associations  # type: ignore[attr-defined]
    FastAssociationSocket.adopt(event.assoc)
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None:  # pragma: no cover - pynetdicom opens a connection with its socket
        return
    with contextlib.suppress(Exception):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if isinstance(sock, ssl.SSLSocket):
        try:
            if limits is not None:
                sock.settimeout(limits.handshake_timeout)
            sock.do_handshake()
            if limits is not None:
                sock.settimeout(limits.idle_timeout)
        except (OSError, ValueError) as exc:
            LOGGER.warning(
                "connection refused reason=tls-handshake-failed address=%s error=%s",
                _event_value(event, "address")[0],
                getattr(exc, "reason", None) or type(exc).__name__,
            )
            guard = getattr(sock, "_guard", None)
            if guard is not None:  # no further reads: after shutdown() they would bypass TLS
                guard.tripped = "tls-handshake-failed"
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return
    LOGGER.info(
        "connection opened address=%s transport=%s",
        _event_value(event, "address")[0],
        describe(sock),
    )


def handle_conn_close(
    event: evt.Event, started: dict[int, float], counts: ConnectionCounts | None = None
) -> None:
    """Connection closed: drop a half-received spool file left by an aborted transfer;
    the association no longer counts against the node's limit."""
    try:
        _discard_partial(event, started)
    finally:
        if counts is not None:
            counts.add(closed=1)
        counted = getattr(event.assoc, "_cspine_counted", None)
        if counted is not None:
            event.assoc._cspine_counted = None  # type: ignore[attr-defined]
            counted.closed()


def _discard_partial(event: evt.Event, started: dict[int, float]) -> None:
    started.pop(id(event.assoc), None)
    with contextlib.suppress(Exception):
        sock = event.assoc.dul.socket
        if isinstance(sock, FastAssociationSocket):
            sock.close_wakeup()
    with contextlib.suppress(Exception):
        message = event.assoc.dimse.message
        spool = getattr(message, "_data_set_file", None)
        if spool is not None:
            spool.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool.name)
            LOGGER.info("partial transfer discarded address=%s", _event_value(event, "address")[0])


def handle_assoc_event(event: evt.Event) -> None:
    """Log association lifecycle with AE titles and peer addresses only."""
    LOGGER.info(
        "association %s calling_ae=%s address=%s pid=%d",
        event.event.name.replace("EVT_", "").lower(),
        str(event.assoc.requestor.ae_title).strip(),
        event.assoc.requestor.address,
        os.getpid(),
    )


class _LimitExceeded(Exception):
    """A peer broke a connection limit (internal to the stream guard)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits enforced on the raw byte stream, before pynetdicom.

    Attributes
    ----------
    idle_timeout
        Seconds one socket read may wait (``node.network_timeout``).
    handshake_timeout
        Seconds for the TLS handshake (``node.acse_timeout``).
    max_seconds
        Lifetime of a connection (``node.max_association_seconds``).
    max_pdu_length
        Largest P-DATA-TF PDU length accepted (``node.max_pdu_size``, which the node
        also advertises as its Maximum Length).
    max_control_pdu_length
        Largest length of any other PDU (A-ASSOCIATE-RQ with many contexts).
    max_dataset_bytes
        Largest data set of one DIMSE message (``node.max_instance_bytes``).
    max_connections
        Open connections beyond which new ones are closed at once.
    """

    idle_timeout: float
    handshake_timeout: float
    max_seconds: float
    max_pdu_length: int
    max_control_pdu_length: int
    max_dataset_bytes: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """Limits from ``node`` settings."""
        node = settings.node
        return cls(
            idle_timeout=node.network_timeout,
            handshake_timeout=node.acse_timeout,
            max_seconds=node.max_association_seconds,
            max_pdu_length=node.max_pdu_size,
            max_control_pdu_length=1024 * 1024,
            max_dataset_bytes=node.max_instance_bytes,
            max_connections=2 * node.max_associations + 2,
        )


class _StreamGuard:
    """Follow the PDU and PDV framing of the bytes read and enforce the limits."""

    def __init__(self, limits: ConnectionLimits, address: str) -> None:
        self.limits = limits
        self.address = address
        self.deadline = time.monotonic() + limits.max_seconds
        self.tripped: str | None = None
        self._head = bytearray()  # pending PDU or PDV header bytes
        self._pdu_type = 0
        self._pdu_left = 0  # body bytes left in the current PDU
        self._pdv_left = 0  # value bytes left in the current PDV item
        self._dataset_bytes = 0  # data set bytes of the current message so far

    def trip(self, reason: str, detail: str) -> _LimitExceeded:
        self.tripped = reason
        LOGGER.warning("association aborted reason=%s %s address=%s", reason, detail, self.address)
        return _LimitExceeded(f"{reason}: {detail}")

    def expired(self) -> bool:
        """Whether the connection is over: a limit was broken or the deadline passed."""
        if not self.tripped and time.monotonic() > self.deadline:
            self.trip("max-duration", f"limit={self.limits.max_seconds:g}s")
        return self.tripped is not None

    def feed(self, data: bytes | memoryview) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._pdu_left == 0:  # PDU header: type, reserved, 32-bit length
                take = min(6 - len(self._head), n - i)
                self._head += data[i : i + take]
                i += take
                if len(self._head) == 6:
                    pdu_type, _, length = struct.unpack(">BBL", self._head)
                    self._head.clear()
                    self._start_pdu(pdu_type, length)
                continue
            if self._pdu_type != 0x04:  # not P-DATA: skip the body
                take = min(self._pdu_left, n - i)
                i += take
                self._pdu_left -= take
                continue
            if self._pdv_left == 0:  # PDV item header: length, context id, control byte
                take = min(6 - len(self._head), n - i, self._pdu_left)
                self._head += data[i : i + take]
                i += take
                self._pdu_left -= take
                if len(self._head) == 6:
                    length, _, control = struct.unpack(">LBB", self._head)
                    self._head.clear()
                    self._start_pdv(max(0, length - 2), control)
                elif self._pdu_left == 0:  # malformed; pynetdicom will refuse the PDU
                    self._head.clear()
                continue
            take = min(self._pdv_left, self._pdu_left, n - i)
            i += take
            self._pdv_left -= take
            self._pdu_left -= take
            if self._pdu_left == 0:
                self._pdv_left = 0

    def _start_pdu(self, pdu_type: int, length: int) -> None:
        limit = (
            self.limits.max_pdu_length if pdu_type == 0x04 else self.limits.max_control_pdu_length
        )
        if length > limit:
            raise self.trip(
                "pdu-too-large", f"pdu_type=0x{pdu_type:02X} length={length} limit={limit}"
            )
        self._pdu_type = pdu_type
        self._pdu_left = length

    def _start_pdv(self, value_length: int, control: int) -> None:
        self._pdv_left = value_length
        if control & 0x01:  # command fragment
            return
        self._dataset_bytes += value_length
        if self._dataset_bytes > self.limits.max_dataset_bytes:
            raise self.trip(
                "instance-too-large",
                f"bytes>{self.limits.max_dataset_bytes}",
            )
        if control & 0x02:  # last fragment of the data set
            self._dataset_bytes = 0


class _GuardMixin:
    """``recv`` that feeds the :class:`_StreamGuard` and enforces the deadline.

    Once a limit is broken the connection is shut down and every further read
    returns end-of-file, which pynetdicom handles as a closed transport (its
    association then ends with an A-P-ABORT).
    """

    _guard: _StreamGuard | None = None

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        guard = self._guard
        if guard is None:
            return super().recv(bufsize, flags)  # type: ignore[misc]
        if guard.expired():
            self._cut()
            return b""
        data = super().recv(bufsize, flags)  # type: ignore[misc]
        try:
            guard.feed(data)
        except _LimitExceeded:
            self._cut()
            return b""
        return data

    def recv_into(self, buffer: Any, nbytes: int | None = 0, flags: int = 0) -> int:
        guard = self._guard
        if guard is None:
            return super().recv_into(buffer, nbytes, flags)  # type: ignore[misc]
        if guard.expired():
            self._cut()
            return 0
        n = super().recv_into(buffer, nbytes or len(buffer), flags)  # type: ignore[misc]
        try:
            guard.feed(memoryview(buffer)[:n])
        except _LimitExceeded:
            self._cut()
            return 0
        return n

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]


class GuardedSocket(_GuardMixin, socket.socket):
    """A plain TCP connection under :class:`ConnectionLimits`."""


class GuardedSSLSocket(_GuardMixin, ssl.SSLSocket):
    """A TLS connection under :class:`ConnectionLimits` (plaintext side)."""


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with guarded, optionally TLS, connections.

    Parameters
    ----------
    *args
        As :class:`pynetdicom.transport.AssociationServer`.
    limits
        The :class:`ConnectionLimits` of every connection.
    listener
        A listening socket shared with other receiver processes.
    associations
        The connection count of all those processes (their
        ``limits.max_connections`` holds for them together).
    """

    def __init__(
        self,
        *args: Any,
        limits: ConnectionLimits,
        listener: socket.socket | None = None,
        associations: AssociationCount | None = None,
        **kwargs: Any,
    ) -> None:
        self.limits = limits
        self._listener = listener
        self._associations = associations
        self._accepted: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        super().__init__(*args, **kwargs)
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = GuardedSSLSocket

    def server_bind(self) -> None:
        """Bind, or adopt the listening socket shared by several receiver processes."""
        if self._listener is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listener
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listen (a shared listener already listens)."""
        if self._listener is None:
            super().server_activate()

    def server_close(self) -> None:
        """Close; a shared listener is closed here only, never shut down for all."""
        if self._listener is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()

    ACCEPT_DELAY_S = 0.005
    """With a shared listener: seconds a receiver waits per association it is already
    serving before it accepts, so that a less busy receiver takes the connection."""

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, wrap in the guard (and TLS, handshake deferred to the thread).

        Receivers sharing one listener are all woken by a new connection and the first to
        call ``accept`` gets it (the others get ``EAGAIN``, which the server's loop
        ignores). Left to chance, four senders often landed three on one receiver and one
        on the other; a receiver thus waits :attr:`ACCEPT_DELAY_S` for each association
        it already serves (at most 20 ms) before it accepts.
        """
        if self.socket is None:
            raise OSError("the server socket is closed")
        if self._listener is not None:
            # counted from the sockets (an association's thread starts a little later)
            busy = sum(1 for conn in self._accepted if conn.fileno() != -1)
            if busy:
                time.sleep(min(busy * self.ACCEPT_DELAY_S, 0.02))
        raw, address = self.socket.accept()
        raw.settimeout(self.limits.idle_timeout)
        sock: GuardedSocket | GuardedSSLSocket
        if self.ssl_context is not None:
            # an instance of GuardedSSLSocket: __init__ sets it as the sslsocket_class
            sock = cast(
                GuardedSSLSocket,
                self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False),
            )
        else:
            sock = GuardedSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            sock.settimeout(self.limits.idle_timeout)
        sock._guard = _StreamGuard(self.limits, str(address[0]))
        self._accepted.add(sock)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Close a new connection at once when too many associations are running (in
        all the receiver processes, when they share a count)."""
        if self._associations is not None:
            running = self._associations.total()
        else:
            running = len(self.active_associations)
        if running >= self.limits.max_connections:
            LOGGER.warning(
                "connection refused reason=too-many-connections running=%d address=%s",
                running,
                client_address[0],
            )
            return False
        return True


def build_ae(settings: Settings) -> AE:
    """Build the Application Entity with its contexts, limits and timeouts."""
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    ae.add_supported_context(Verification)
    for sop_class in storage_sop_classes(settings):
        register_storage_class(sop_class)
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    # in one process; with several, handle_requested holds the node's total as well
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
        journal = receiver.journal
        self.checker = CompletionChecker(
            receiver.catalog,
            settings.completion.stable_seconds,
            clock,
            on_complete,
            waiting_studies=journal.waiting_studies if journal is not None else None,
        )
        self._started: dict[int, float] = {}
        self.connections = ConnectionCounts()
        """TCP connections opened and closed (see :class:`ConnectionCounts`)."""
        self._server: Any = None
        self._scheduler: Any = None
        self._lock = threading.Lock()

    def start(
        self,
        *,
        block: bool = False,
        ssl_context: Any = None,
        extra_jobs: list[tuple[Callable[[], Any], float, str]] = (),  # type: ignore[assignment]
        listener: socket.socket | None = None,
        completion: bool = True,
        associations: AssociationCount | None = None,
    ) -> None:
        """Bind and serve; with ``block=False`` return once listening.

        ``ssl_context`` overrides the context built from ``node.tls`` (which is used
        when ``node.tls.enabled``); with either, the listener accepts TLS only.
        ``extra_jobs`` are ``(function, interval_s, name)`` run by the same scheduler.
        ``listener`` is a listening socket shared with other receiver processes (none:
        bind ``node.host``/``node.port``); ``completion=False`` leaves the completion
        checker to another process. ``associations`` is this process's slot in the
        node-wide association count of several receiver processes.
        """
        from apscheduler.schedulers.background import BackgroundScheduler

        check_bind_safety(self.settings)
        node = self.settings.node
        if ssl_context is None and node.tls.enabled:
            ssl_context = server_context(node.tls)
        limits = ConnectionLimits.from_settings(self.settings)
        _config.STORE_RECV_CHUNKED_DATASET = True
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's standard handlers format a DEBUG dump of every PDU and DIMSE
            # message whether or not it is logged: bind them only when it is
            _config.LOG_HANDLER_LEVEL = "none"
        # pynetdicom spools into tempfile's folder: keep it on the store's filesystem
        tempfile.tempdir = str(self.receiver.store.tmp_dir)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.receiver]),
            (evt.EVT_REQUESTED, handle_requested, [self.settings, associations]),
            (
                evt.EVT_CONN_OPEN,
                handle_conn_open,
                [self._started, limits, self.connections, associations],
            ),
            (evt.EVT_CONN_CLOSE, handle_conn_close, [self._started, self.connections]),
            (evt.EVT_ABORTED, handle_assoc_event),
            (evt.EVT_ACCEPTED, handle_assoc_event),
            (evt.EVT_RELEASED, handle_assoc_event),
        ]
        if node.user_identity.enabled:
            handlers.append((evt.EVT_USER_ID, handle_user_id, [self.settings]))
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        if completion:
            self._scheduler.add_job(
                self._safe(self.checker.tick),
                "interval",
                seconds=self.settings.completion.check_interval_seconds,
                id="completion",
            )
        watch_every = min(5.0, max(0.2, node.max_association_seconds / 4))
        self._scheduler.add_job(
            self._safe(self._watchdog), "interval", seconds=watch_every, id="watchdog"
        )
        for fn, interval, name in extra_jobs:
            self._scheduler.add_job(self._safe(fn), "interval", seconds=interval, id=name)
        self._scheduler.start()
        server = self.ae.make_server(
            (node.host, node.port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=GuardedServer,
            limits=limits,
            listener=listener,
            associations=associations,
        )
        # as AE.start_server does: the AE tracks its servers (AE.shutdown, server.shutdown)
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="cspine-scp", daemon=True).start()
        self._server = server
        LOGGER.info(
            "listening ae_title=%s host=%s port=%d tls=%s user_identity=%s pid=%d",
            node.ae_title,
            node.host,
            self.port,
            "on" if ssl_context is not None else "off",
            "on" if node.user_identity.enabled else "off",
            os.getpid(),
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
        """Cut connections older than the maximum association duration.

        The socket is shut down rather than ``assoc.abort()`` called: abort waits for
        the association's reader, which may be blocked in a read, so it could hang this
        thread. The shutdown wakes the reader, which then ends the association.
        """
        limit = self.settings.node.max_association_seconds
        now = time.monotonic()
        if self._server is None:
            return
        for assoc in list(self._server.active_associations):
            began = self._started.get(id(assoc))
            if began is not None and now - began > limit + 1.0:
                self._started.pop(id(assoc), None)  # cut once, log once
                LOGGER.warning(
                    "association aborted reason=max-duration by=watchdog address=%s",
                    assoc.requestor.address,
                )
                with contextlib.suppress(Exception):
                    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Stop serving and housekeeping."""
        with self._lock:
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=False)
                self._scheduler = None
            if self._server is not None:
                self._server.shutdown()
                self._server = None
