"""A plain C-STORE success response without pynetdicom's per-message data set round trip.

pynetdicom turns every response primitive into a pydicom command set and encodes it
twice (once to measure the group length, once to send): about 0.4 ms of the receiver's
CPU per stored instance. The success response of a C-STORE has a fixed layout (PS3.7
9.3.1.2; the command set is always implicit VR little endian, PS3.7 6.3.1), so
:func:`encode_store_success` writes those seven elements directly, and
:func:`install` routes exactly that case of an association's ``send_msg`` to it. Every
other message (a failure or warning status, a status with an error comment, any other
DIMSE service) goes through pynetdicom unchanged. ``tests/dicom_node/test_store_rsp.py``
checks the bytes against pynetdicom's own encoding.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

_OPTIONAL = ("OffendingElement", "ErrorComment")
"""Response attributes that, when set, send the message through pynetdicom."""


def _uid(tag_element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, tag_element, len(value)) + value


def _us(tag_element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, tag_element, 2, value)


def encode_store_success(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int = 0x0000
) -> bytes:
    """The command set of a C-STORE-RSP, implicit VR little endian.

    Parameters
    ----------
    message_id
        The request's Message ID (Message ID Being Responded To).
    sop_class_uid, sop_instance_uid
        Affected SOP Class and Instance UIDs (from the request).
    status
        The status (success, or a warning with no further attribute).
    """
    body = b"".join(
        (
            _uid(0x0002, sop_class_uid),  # Affected SOP Class UID
            _us(0x0100, 0x8001),  # Command Field: C-STORE-RSP
            _us(0x0120, message_id),  # Message ID Being Responded To
            _us(0x0800, 0x0101),  # Command Data Set Type: no data set
            _us(0x0900, status),  # Status
            _uid(0x1000, sop_instance_uid),  # Affected SOP Instance UID
        )
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _plain(primitive: Any) -> bool:
    """A C-STORE response pynetdicom would encode as the seven fixed elements."""
    return (
        isinstance(primitive, C_STORE)
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status == 0x0000
        and primitive.AffectedSOPClassUID is not None
        and primitive.AffectedSOPInstanceUID is not None
        and all(getattr(primitive, name, None) is None for name in _OPTIONAL)
    )


def install(dimse: Any) -> None:
    """Send plain C-STORE success responses of this association's DIMSE provider directly.

    Parameters
    ----------
    dimse
        The association's ``pynetdicom.dimse.DIMSEServiceProvider``. A command set
        longer than the peer's maximum PDU allows in one fragment (which a plain
        response never is) goes through pynetdicom.
    """
    original = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if not send_plain(dimse, primitive, context_id):
            original(primitive, context_id)

    dimse.send_msg = send_msg


def send_plain(dimse: Any, primitive: Any, context_id: int) -> bool:
    """Queue ``primitive`` as one P-DATA if it is a plain C-STORE success; whether it was."""
    if not _plain(primitive):
        return False
    command = encode_store_success(
        int(primitive.MessageIDBeingRespondedTo),
        str(primitive.AffectedSOPClassUID),
        str(primitive.AffectedSOPInstanceUID),
    )
    if not _fits(dimse, command):
        return False
    _queue(dimse, context_id, command)
    return True


def _fits(dimse: Any, command: bytes) -> bool:
    """Whether ``command`` fits one P-DATA fragment of the peer's maximum PDU."""
    max_pdu = dimse.maximum_pdu_size
    return not (max_pdu and len(command) > max_pdu - 6)


def _queue(dimse: Any, context_id: int, command: bytes) -> None:
    """Queue ``command`` as one last command fragment for the DUL to send."""
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
    dimse.dul.send_pdu(pdata)


_PDU_HEAD = struct.Struct(">BBIIBB")


def store_success_pdu(context_id: int, command: bytes) -> bytes:
    """A whole P-DATA-TF PDU carrying one command set as its only fragment.

    One presentation data value whose message control header is ``0x03``: a command,
    last fragment (PS3.8 E.2).
    """
    item_length = 2 + len(command)  # context ID, control header, fragment
    return _PDU_HEAD.pack(0x04, 0, 4 + item_length, item_length, context_id, 0x03) + command


def send_store_success(
    dimse: Any, context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str
) -> bool:
    """Answer a C-STORE with success from the thread that reads the association.

    The PDU is written to the socket at once when nothing else waits to be sent (the
    caller is the DUL's own thread, which alone writes to the socket); otherwise it is
    queued behind what waits, as pynetdicom would.

    Returns
    -------
    bool
        False when the peer's maximum PDU cannot hold the response in one fragment
        (nothing was sent; pynetdicom must fragment it).
    """
    command = encode_store_success(message_id, sop_class_uid, sop_instance_uid)
    if not _fits(dimse, command):
        return False
    if dimse.dul.to_provider_queue.empty():
        dimse.dul.socket.send(store_success_pdu(context_id, command))
    else:
        _queue(dimse, context_id, command)
    return True
