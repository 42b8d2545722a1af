"""Sending instances by C-STORE (the ``send`` command, ``synth --send`` and result delivery)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from config import NodeError

LOGGER = logging.getLogger(__name__)


class SendError(NodeError):
    """No association could be established, or it broke (transient)."""


@dataclass
class SendSummary:
    """Per-file outcome of a send."""

    statuses: dict[Path, int | None] = field(default_factory=dict)
    errors: dict[Path, str] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        """Files acknowledged with a Success or Warning status (see :func:`stored`)."""
        return sum(1 for s in self.statuses.values() if s is not None and stored(s))

    @property
    def failed(self) -> int:
        """Files not acknowledged as stored."""
        return len(self.statuses) - self.sent


def stored(status: int) -> bool:
    """Whether a C-STORE response status says the instance was stored.

    Success (0x0000) and the Warning statuses (0xBxxx, 0x0001, 0x0107, 0x0116) do, by
    pynetdicom's status categories (PS3.7 Annex C); everything else does not.
    """
    return code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def out_of_resources(status: int) -> bool:
    """Whether a C-STORE status is "Refused: Out of Resources" (0xA7xx, PS3.4 B.2.3).

    The one failure worth retrying unchanged: the SCP may have room later.
    """
    return 0xA700 <= status <= 0xA7FF


def serve_no_requests(assoc: Any) -> Any:
    """Keep a requestor's own reactor thread from taking DIMSE messages off its queue,
    and never wait for an A-RELEASE-RP from a peer that is gone.

    pynetdicom's ``send_c_store`` (and ``send_c_echo``) pauses the requestor's reactor
    while it waits for the response, but the pause has a window: the reactor may have
    seen the checkpoint still set, and then call ``get_msg(block=False)`` after the
    request went out. A peer that answers within that window (a few milliseconds when
    the reactor thread waits for the CPU) loses its response to the reactor, which
    drops it as an unexpected message; ``send_c_store`` then waits for the DIMSE
    timeout and the association is aborted. The node's associations as a requestor
    serve no requests, so the reactor's non-blocking polls get nothing here; the calls
    that wait for a response (``block=True``) get the message.

    A wait that ends with nothing (the connection closed, an A-ABORT, the DIMSE
    timeout) marks the association lost (:func:`association_lost`), and ``release()``
    then aborts instead: pynetdicom's ``release()`` right after such a wait may find
    the reactor's pause flag still set from the wait, send an A-RELEASE-RQ, and wait
    the whole ACSE timeout for an answer while the reactor takes the abort indication
    off the queue.

    Returns
    -------
    pynetdicom.association.Association
        ``assoc``, its DIMSE provider's ``get_msg`` and its ``release`` wrapped.
    """
    get_msg = assoc.dimse.get_msg
    release = assoc.release
    lost: list[bool] = []

    def only_waiting_callers(block: bool = False) -> Any:
        if not block:
            return None, None
        message = get_msg(block=True)
        if message[1] is None:
            lost.append(True)
        return message

    def release_unless_lost() -> None:
        if not assoc.is_established:
            return
        if association_lost(assoc):
            assoc.abort()
        else:
            release()

    only_waiting_callers.lost = lost  # type: ignore[attr-defined]
    assoc.dimse.get_msg = only_waiting_callers
    assoc.release = release_unless_lost
    return assoc


def association_lost(assoc: Any) -> bool:
    """Whether a requestor association can carry no more requests: not established,
    aborted (an A-ABORT or A-P-ABORT waits for its reactor), or, under
    :func:`serve_no_requests`, a wait for a response that ended with nothing."""
    if not assoc.is_established or assoc.is_aborted or assoc.acse.is_aborted():
        return True
    return bool(getattr(assoc.dimse.get_msg, "lost", False))


def collect_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of files."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise NodeError(f"no such file or folder: {path}")
    return out


def _contexts(metas: dict[Path, tuple[str, str]]) -> list:
    by_class: dict[str, set[str]] = {}
    for sop_class, ts in metas.values():
        by_class.setdefault(sop_class, set()).add(ts)
    contexts = []
    for sop_class, syntaxes in sorted(by_class.items()):
        for ts in sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}):
            contexts.append(build_context(sop_class, ts))
    if len(contexts) > 128:
        raise NodeError("too many SOP class / transfer syntax combinations for one association")
    return contexts


def send_paths(
    paths: Sequence[Path],
    ae_title: str,
    host: str,
    port: int,
    calling_ae: str = "CSPINE-SCU",
    *,
    progress: Callable[[Path, int | None], None] | None = None,
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> SendSummary:
    """C-STORE files to a remote AE over one association.

    Parameters
    ----------
    paths
        DICOM files (Part 10) to send.
    ae_title, host, port
        The called AE.
    calling_ae
        Our AE title.
    progress
        Called after each file with its status (``None`` when not sent).
    timeout
        ACSE/DIMSE/network timeout in seconds.
    ssl_context
        Client TLS context (see :func:`dicom_node.tls.client_context`), or ``None``
        for plain TCP. The server certificate is checked against ``host``.

    Returns
    -------
    SendSummary
        Status per file.

    Raises
    ------
    SendError
        When the association is rejected, aborted or cannot be opened.
    """
    summary = SendSummary()
    metas: dict[Path, tuple[str, str]] = {}
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            metas[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except Exception as exc:
            summary.statuses[path] = None
            summary.errors[path] = f"not a DICOM file: {type(exc).__name__}"
            if progress:
                progress(path, None)
    if not metas:
        return summary
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = _contexts(metas)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    tls_args = (ssl_context, host) if ssl_context is not None else None
    transport = "TLS" if ssl_context is not None else "TCP"
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    except (OSError, RuntimeError) as exc:
        raise SendError(f"cannot connect to {ae_title}@{host}:{port} ({transport}): {exc}") from exc
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise SendError(f"association with {ae_title}@{host}:{port} ({transport}) {reason}")
    serve_no_requests(assoc)
    dul_socket = assoc.dul.socket
    if dul_socket is not None and dul_socket.socket is not None:
        with contextlib.suppress(Exception):
            dul_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for path in metas:
            if association_lost(assoc):
                summary.statuses[path] = None
                summary.errors[path] = "association lost"
                continue
            try:
                rsp = assoc.send_c_store(path)
                status = int(rsp.Status) if "Status" in rsp else None
            except (ValueError, AttributeError, OSError) as exc:
                status = None
                summary.errors[path] = str(exc)
            summary.statuses[path] = status
            if status is None and path not in summary.errors:
                summary.errors[path] = "no response (association aborted or timed out)"
            elif status is not None and not stored(status):
                comment = rsp.get("ErrorComment", "")
                summary.errors[path] = f"status 0x{status:04X} {comment}".strip()
            if progress:
                progress(path, status)
    finally:
        if assoc.is_established:
            assoc.release()
    if any(s is None for p, s in summary.statuses.items() if p in metas) and not assoc.is_released:
        LOGGER.warning("association with %s ended early", ae_title)
    return summary
