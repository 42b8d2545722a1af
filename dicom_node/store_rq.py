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
from io import BytesIO
from pathlib import Path
from typing import Any, cast

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


def decode_msg(message: Any, primitive: Any, assoc: Any) -> bool:
    """``DIMSEMessage.decode_msg`` for one message, spooling with plain writes.

    Returns whether the message is complete, as pynetdicom's does.
    """
    for context_id, data in primitive.presentation_data_value_list:
        control = data[0]
        if control & 1:  # command set fragment
            message.encoded_command_set.write(data[1:])
            if not control & 2:
                continue
            message.context_id = context_id
            message.command_set = decode(message.encoded_command_set, True, True)
            message.__class__ = _MESSAGE_TYPES[int(message.command_set.CommandField)][1]
            if message.command_set.CommandDataSetType == 0x0101:
                return True  # no data set
            if isinstance(message, C_STORE_RQ):
                message = cast(Any, message)  # it holds a SpoolFile, not pynetdicom's NTF
                command = message.command_set
                spool = open_spool()
                message._data_set_file = spool
                message._data_set_path = Path(spool.name)
                try:
                    spool.write(
                        file_meta_bytes(
                            command.AffectedSOPClassUID,
                            command.AffectedSOPInstanceUID,
                            assoc._accepted_cx[context_id].transfer_syntax[0],
                        )
                    )
                except BaseException:
                    spool.close()
                    with contextlib.suppress(OSError):
                        os.unlink(spool.name)
                    message._data_set_file = None
                    message._data_set_path = None
                    raise
        else:  # data set fragment
            sink = message._data_set_file
            if sink is not None:
                sink.write(memoryview(data)[1:])
            else:
                message.data_set.write(data[1:])
            if control & 2:
                return True
    return False


def install(dimse: Any) -> None:
    """Spool the C-STORE data sets this association's DIMSE provider receives directly.

    Parameters
    ----------
    dimse
        The association's ``pynetdicom.dimse.DIMSEServiceProvider``; its
        ``receive_primitive`` gives each new message :func:`decode_msg`.
    """
    original = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        if dimse.message is None:
            message: Any = DIMSEMessage()
            # an instance attribute: it survives decode_msg's change of class
            message.decode_msg = lambda p, a=None: decode_msg(message, p, a)
            dimse.message = message
        original(primitive)

    dimse.receive_primitive = receive_primitive
