"""A C-STORE request's data set written straight into its spool file.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom spools each received data set into a
``NamedTemporaryFile``: a buffered file object, a random name, the File Meta Information
built as a pydicom dataset and encoded, and one ``write`` plus one ``flush`` per
fragment. That is about a millisecond of the receiver's CPU per 512x512 instance, on
the thread that also reads the socket. :func:`install` gives each DIMSE message of an
association a decoder that does the same with plain file-descriptor writes:

- the command set is decoded by pydicom exactly as pynetdicom does (the association
  needs its primitive);
- for a C-STORE request with a data set, the spool file is opened with ``O_EXCL``
  under a name made of a per-process token and a counter, in the folder pynetdicom
  would use (``tempfile.gettempdir()``, which the node points at the store's spool);
- the preamble and the File Meta Information are written in one call, encoded by
  :func:`file_meta_bytes` (byte-identical to pynetdicom's ``create_file_meta`` with
  pydicom's ``write_file_meta_info``; ``tests/dicom_node/test_store_rq.py`` compares
  them); a UID that is not 1-64 digits and dots goes through pydicom instead;
- each data set fragment is written from a view of the received PDV, without a copy.

The spool file object keeps the two things the rest of pynetdicom and the node use:
``name`` and ``close()``. Everything else (the events, the handler, the response, the
deletion of a spool file the handler did not consume, the discard of a half-received
file when a connection drops) is unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import create_file_meta, decode

_TOKEN = secrets.token_hex(4)
_COUNTER = itertools.count()
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


class SpoolFile:
    """An open spool file: what pynetdicom's ``NamedTemporaryFile`` is used for."""

    __slots__ = ("fd", "name")

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def write(self, data: bytes | memoryview) -> None:
        """Write all of ``data`` (a regular file may take it in several calls)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        """Close the descriptor (again: a no-op)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _element(tag_element: int, vr: bytes, value: bytes) -> bytes:
    """One group-2 element, explicit VR little endian (short-length VRs, and OB)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, tag_element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


_UID_CHARS = re.compile(r"[0-9.]{1,64}")


def _plain_uid(value: object) -> bool:
    """Digits and dots only, 1-64 of them: pydicom writes such a value as it is."""
    return isinstance(value, str) and _UID_CHARS.fullmatch(value) is not None


_PREAMBLE = b"\0" * 128 + b"DICM"
_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
_IMPLEMENTATION = _element(0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)) + _element(
    0x0013, b"SH", _VERSION + b" " * (len(_VERSION) % 2)
)
"""The File Meta's two elements that name pynetdicom (the same for every instance)."""


def file_meta_bytes(sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> bytes:
    """The 128-byte preamble, ``DICM`` and the File Meta Information pynetdicom writes.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid
        Affected SOP Class and Instance UIDs of the C-STORE request, as decoded
        (``None``, or anything but 1-64 digits and dots, goes through pydicom).
    transfer_syntax
        The accepted transfer syntax of the request's presentation context.
    """
    if not all(_plain_uid(uid) for uid in (sop_class_uid, sop_instance_uid, transfer_syntax)):
        buf = BytesIO()
        buf.write(_PREAMBLE)
        meta = create_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
        )
        write_file_meta_info(buf, meta)  # type: ignore[arg-type]
        return buf.getvalue()
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0010, b"UI", _ui(transfer_syntax)),
            _IMPLEMENTATION,
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + group_length + body


def open_spool(folder: str | None = None) -> SpoolFile:
    """Create a new spool file (``O_EXCL``, mode 0600) in ``folder`` (default: tempdir)."""
    folder = folder or tempfile.gettempdir()
    while True:
        name = os.path.join(folder, f"rq-{_TOKEN}-{os.getpid()}-{next(_COUNTER)}.dcm")
        try:
            return SpoolFile(os.open(name, _FLAGS, 0o600), name)
        except FileExistsError:  # another host's process with the same token and pid
            continue


def parse_command(raw: bytes) -> dict[int, bytes] | None:
    """The elements of an encoded command set, by element number, or ``None``.

    A command set is group 0000 in implicit VR little endian (PS3.7 6.3.1); any
    other group, a truncated element or an undefined length gives ``None``.
    """
    fields: dict[int, bytes] = {}
    view = memoryview(raw)
    i, n = 0, len(view)
    while i < n:
        if n - i < 8:
            return None
        group, element, length = _ELEMENT_HEAD.unpack_from(view, i)
        i += 8
        if group != 0 or length > n - i:
            return None
        fields[element] = bytes(view[i : i + length])
        i += length
    return fields


_ELEMENT_HEAD = struct.Struct("<HHI")
_US = struct.Struct("<H")


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE request whose command set was read without pydicom (see :func:`plain_store`)."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


def _plain_uid_value(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        text = value.rstrip(b"\0 ").decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if _plain_uid(text) else None


def plain_store(fields: dict[int, bytes], context_id: int) -> StoreRequest | None:
    """The request, when ``fields`` are a C-STORE-RQ pynetdicom would take as it is.

    That is: Command Field C-STORE-RQ with a data set, a 2-byte Message ID, a Priority
    of 0, 1 or 2, and Affected SOP Class and Instance UIDs of 1-64 digits and dots
    (after the trailing padding pydicom also strips). Anything else is ``None``: the
    message then goes through pydicom and pynetdicom as before.
    """
    try:
        if _US.unpack(fields[0x0100])[0] != 0x0001:  # Command Field: C-STORE-RQ
            return None
        if _US.unpack(fields[0x0800])[0] == 0x0101:  # no data set
            return None
        message_id = _US.unpack(fields[0x0110])[0]
        if _US.unpack(fields[0x0700])[0] not in (0, 1, 2):  # Priority
            return None
    except (KeyError, struct.error):
        return None
    sop_class = _plain_uid_value(fields.get(0x0002))
    sop_instance = _plain_uid_value(fields.get(0x1000))
    if sop_class is None or sop_instance is None:
        return None
    return StoreRequest(context_id, message_id, sop_class, sop_instance)


class InlineStore(Protocol):
    """Serves a complete C-STORE request on the thread that read it (see :func:`install`)."""

    def takes(self, request: StoreRequest) -> bool:
        """Whether this request is served here (else it goes to pynetdicom)."""

    def __call__(self, request: StoreRequest, path: str) -> None:
        """Answer the request whose data set is the closed spool file ``path``."""


def decode_msg(
    message: Any,
    pdvs: Iterable[tuple[int, Any]],
    assoc: Any,
    inline: InlineStore | None = None,
) -> bool:
    """``DIMSEMessage.decode_msg`` for one message, spooling with plain writes.

    Parameters
    ----------
    message
        The association's DIMSE message being received.
    pdvs
        ``(context ID, control header + fragment)`` of a P-DATA's presentation data values.
    assoc
        The association.
    inline
        Serves plain C-STORE requests itself; such a request is then answered when
        its last fragment arrives, and this returns false (pynetdicom has nothing to
        do). ``None``: every message goes to pynetdicom.

    Returns
    -------
    bool
        Whether the message is complete and is pynetdicom's to handle, as
        pynetdicom's own ``decode_msg`` returns.
    """
    for context_id, data in pdvs:
        control = data[0]
        if control & 1:  # command set fragment
            message.encoded_command_set.write(data[1:])
            if not control & 2:
                continue
            message.context_id = context_id
            request = None
            if inline is not None and context_id in assoc._accepted_cx:
                fields = parse_command(message.encoded_command_set.getvalue())
                if fields is not None:
                    request = plain_store(fields, context_id)
                if request is not None and not inline.takes(request):
                    request = None
            if request is not None:
                message.__class__ = C_STORE_RQ
                message.inline_request = request
                _open_spool(
                    message,
                    request.sop_class_uid,
                    request.sop_instance_uid,
                    assoc._accepted_cx[context_id].transfer_syntax[0],
                )
                continue
            message.command_set = decode(message.encoded_command_set, True, True)
            message.__class__ = _MESSAGE_TYPES[int(message.command_set.CommandField)][1]
            if message.command_set.CommandDataSetType == 0x0101:
                return True  # no data set
            if isinstance(message, C_STORE_RQ):
                command = message.command_set
                _open_spool(
                    message,
                    command.AffectedSOPClassUID,
                    command.AffectedSOPInstanceUID,
                    assoc._accepted_cx[context_id].transfer_syntax[0],
                )
        else:  # data set fragment
            sink = message._data_set_file
            if sink is not None:
                try:
                    sink.write(memoryview(data)[1:])
                except BaseException:  # e.g. ENOSPC: pynetdicom then aborts the association
                    _drop_spool(message)
                    raise
            else:
                message.data_set.write(data[1:])
            if control & 2:
                request = getattr(message, "inline_request", None)
                if request is None or inline is None:
                    return True
                spool = message._data_set_file
                spool.close()
                assoc.dimse.message = None  # as pynetdicom does once a message is complete
                inline(request, spool.name)
                return False
    return False


def _open_spool(message: Any, sop_class_uid: Any, sop_instance_uid: Any, syntax: Any) -> None:
    """Open the message's spool file and write its preamble and File Meta."""
    spool = open_spool()
    message._data_set_file = spool
    message._data_set_path = Path(spool.name)
    try:
        spool.write(file_meta_bytes(sop_class_uid, sop_instance_uid, syntax))
    except BaseException:
        _drop_spool(message)
        raise


def _drop_spool(message: Any) -> None:
    """Close and delete the message's spool file (a write failed; nothing was answered)."""
    spool = message._data_set_file
    message._data_set_file = None
    message._data_set_path = None
    spool.close()
    with contextlib.suppress(OSError):
        os.unlink(spool.name)


def install(dimse: Any, inline: InlineStore | None = None) -> None:
    """Spool the C-STORE data sets this association's DIMSE provider receives directly.

    Parameters
    ----------
    dimse
        The association's ``pynetdicom.dimse.DIMSEServiceProvider``; its
        ``receive_primitive`` gives each new message :func:`decode_msg`.
    inline
        Serves plain C-STORE requests on the reading thread (see :func:`decode_msg`).
    """
    original = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        if dimse.message is None:
            message: Any = DIMSEMessage()
            # an instance attribute: it survives decode_msg's change of class
            message.decode_msg = lambda p, a=None: decode_msg(
                message, p.presentation_data_value_list, a, inline
            )
            dimse.message = message
        original(primitive)

    dimse.receive_primitive = receive_primitive
