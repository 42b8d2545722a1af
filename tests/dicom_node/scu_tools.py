"""SCU helpers for tests: raw C-STORE of a file's bytes, and cut-off transfers."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

from dicom_node.scu import serve_no_requests
from tests.helpers import CT, MR


@contextlib.contextmanager
def chunked_send() -> Iterator[None]:
    """Send files' bytes as they are (no decode/re-encode), as a hostile or exact peer would."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


serves_no_requests = serve_no_requests
"""The product's guard (:func:`dicom_node.scu.serve_no_requests`), for test senders."""


def associate(port: int, *, calling: str = "TESTSCU", called: str = "CSPINE", sop_class=CT):
    ae = AE(ae_title=calling)
    # one context per transfer syntax: byte-exact sending needs an exact match
    ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    ae.add_requested_context(sop_class, "1.2.840.10008.1.2")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return serves_no_requests(ae.associate("127.0.0.1", port, ae_title=called))


def store_file(port: int, path: Path, **kw) -> Dataset | None:
    """C-STORE one file sent byte-for-byte; return the response (None if none came)."""
    assoc = associate(port, **kw)
    assert assoc.is_established, "association not established"
    try:
        with chunked_send():
            rsp = assoc.send_c_store(path)
        return rsp if "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()


def store_files(port: int, paths: list[Path], **kw) -> list[int | None]:
    """C-STORE files over one association; statuses in order."""
    assoc = associate(port, **kw)
    assert assoc.is_established, "association not established"
    out: list[int | None] = []
    try:
        with chunked_send():
            for path in paths:
                rsp = assoc.send_c_store(path)
                out.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def send_until_refused(assoc, paths: list[Path], on_ack=None) -> list[str]:
    """C-STORE ``paths`` byte for byte until one fails; the SOP Instance UIDs acked 0x0000.

    ``on_ack(acked)`` runs after each success (e.g. to kill the server mid-transfer).
    The association is left as it is (released, aborted or still open: the caller's
    business).
    """
    import pydicom

    acked: list[str] = []
    with chunked_send():
        for path in paths:
            try:
                rsp = assoc.send_c_store(path)
            except Exception:
                break
            if rsp.get("Status") != 0:
                break
            acked.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            if on_ack is not None:
                on_ack(acked)
    return acked


def _detach(assoc) -> socket.socket:
    """Take the raw socket from an established association and stop its threads.

    The association's DUL and reactor threads would otherwise poll a socketless
    association every millisecond until their network timeout: a few of them left
    behind by earlier tests slow every receiver in the process, which is what made the
    node's notice of a vanished peer late under the full suite.
    """
    sock = assoc.dul.socket.socket
    assoc.dul.socket.socket = None
    assoc._kill = True
    assoc._reactor_checkpoint.set()
    assoc.dul._kill_thread = True
    for thread in (assoc.dul, assoc):
        if thread.is_alive():
            thread.join(timeout=5)
    assert not assoc.dul.is_alive(), "the SCU's DUL thread did not stop"
    return sock


def partial_store(port: int, ds: Dataset, fraction: float = 0.5) -> socket.socket:
    """Start a C-STORE and send part of the data set's PDUs; return the raw socket, open.

    The association object lets go of the socket: the caller owns it from here (close it,
    reset it, or let it stall).
    """
    from io import BytesIO

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.pdu import P_DATA_TF

    assoc = associate(port)
    assert assoc.is_established
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)  # explicit VR little endian
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(buf.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CT)
    pdus = list(msg.encode_msg(cx.context_id, 4096))
    sock = _detach(assoc)
    for primitive in pdus[: max(2, int(len(pdus) * fraction))]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        sock.sendall(pdu.encode())
    return sock


def cut_off_store(port: int, ds: Dataset, fraction: float = 0.5) -> None:
    """Start a C-STORE, send part of the data set's PDUs, then drop the TCP connection
    (no A-ABORT, no A-RELEASE)."""
    partial_store(port, ds, fraction).close()


__all__ = [
    "MR",
    "associate",
    "chunked_send",
    "cut_off_store",
    "partial_store",
    "store_file",
    "store_files",
]
