"""C-STORE served on the association's reading thread, against pynetdicom's own path."""

from __future__ import annotations

import logging
import struct
from io import BytesIO

import pytest
from pydicom.uid import generate_uid
from pynetdicom import _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.service_class import StorageServiceClass

from dicom_node import scp, store_rq, store_rsp
from tests.dicom_node.scu_tools import associate, chunked_send
from tests.dicom_node.test_scp import BAD_CASES, _bad, _instances
from tests.helpers import CT, ct_slice


def _command(**values) -> bytes:
    """A C-STORE-RQ command set as pynetdicom encodes it."""
    req = C_STORE()
    req.MessageID = values.get("message_id", 7)
    req.AffectedSOPClassUID = values.get("sop_class", CT)
    req.AffectedSOPInstanceUID = values.get("sop_instance", "1.2.3.4")
    req.Priority = values.get("priority", 2)
    req.DataSet = BytesIO(b"\0")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return encode(msg.command_set, True, True)


@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", "1." + "2" * 62])
def test_a_plain_command_set_reads_as_pynetdicom_reads_it(sop_instance):
    fields = store_rq.parse_command(_command(message_id=513, sop_instance=sop_instance))
    assert fields is not None
    request = store_rq.plain_store(fields, context_id=5)
    assert request == store_rq.StoreRequest(5, 513, CT, sop_instance)


def test_anything_else_is_left_to_pynetdicom():
    assert store_rq.parse_command(_command()[:-3]) is None  # truncated element
    assert store_rq.parse_command(b"\x08\x00\x16\x00\x02\x00\x00\x00ab") is None  # group 0008
    fields = store_rq.parse_command(_command())
    assert fields is not None
    for change in (
        {0x0100: struct.pack("<H", 0x0030)},  # C-ECHO-RQ
        {0x0800: struct.pack("<H", 0x0101)},  # no data set
        {0x0700: struct.pack("<H", 3)},  # no such priority
        {0x1000: b"1.2.3.abc\0"},  # letters in the UID
        {0x1000: b"1." + b"2" * 64},  # 66 characters
        {0x0002: b"\xff1.2"},  # not ASCII
        {0x0110: b"\x01"},  # a Message ID of one byte
    ):
        assert store_rq.plain_store({**fields, **change}, 1) is None, change
    for missing in (0x0002, 0x1000, 0x0110, 0x0700, 0x0100, 0x0800):
        assert store_rq.plain_store({k: v for k, v in fields.items() if k != missing}, 1) is None


def test_p_data_values_are_split_as_pynetdicom_splits_them():
    body = struct.pack(">IBB", 5, 1, 0x03) + b"abc" + struct.pack(">IBB", 2, 3, 0x02)
    values = scp.split_pdvs(bytearray(body))
    assert values is not None
    assert [(cx, bytes(data)) for cx, data in values] == [(1, b"\x03abc"), (3, b"\x02")]
    for bad in (b"", body[:-1], struct.pack(">IB", 1, 1), body + b"\0\0\0"):
        assert scp.split_pdvs(bytearray(bad)) is None, bad


def test_the_response_pdu_carries_pynetdicoms_command():
    command = store_rsp.encode_store_success(9, CT, "1.2.3")
    pdu = store_rsp.store_success_pdu(3, command)
    pdu_type, _, length, item_length, context_id, control = struct.unpack_from(">BBIIBB", pdu)
    assert (pdu_type, context_id, control) == (0x04, 3, 0x03)
    assert length == len(pdu) - 6 and item_length == length - 4
    assert pdu[12:] == command


def _scp_calls(monkeypatch) -> list[str]:
    """Count the C-STOREs that reach pynetdicom's Storage service class."""
    calls: list[str] = []
    original = StorageServiceClass.SCP

    def counting(self, req, context):
        calls.append(str(req.AffectedSOPInstanceUID))
        return original(self, req, context)

    monkeypatch.setattr(StorageServiceClass, "SCP", counting)
    return calls


def _send(port, paths) -> list[tuple[int, str]]:
    assoc = associate(port)
    assert assoc.is_established
    out = []
    try:
        with chunked_send():
            for path in paths:
                rsp = assoc.send_c_store(path)
                out.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
        echo = assoc.send_c_echo()  # another service on the same association
        assert echo.Status == 0
    finally:
        assoc.release()
    return out


def _cases(tmp_path) -> list:
    good = tmp_path / "good.dcm"
    ct_slice(generate_uid(), generate_uid(), 0).save_as(good, enforce_file_format=True)
    bad = [_bad(tmp_path / name, BAD_CASES[name][0]) for name in sorted(BAD_CASES)]
    return [good, good, *bad]  # the second time: a known instance


def test_inline_answers_equal_pynetdicoms_and_skip_its_service_class(
    start_node, tmp_path, monkeypatch
):
    for name in BAD_CASES:
        (tmp_path / name).mkdir()
    paths = _cases(tmp_path)
    calls = _scp_calls(monkeypatch)
    with monkeypatch.context() as off:
        off.setattr(scp, "inline_store_for", lambda assoc: None)
        reference = start_node()
        expected = _send(reference.port, paths)
    assert len(calls) == len(paths)  # pynetdicom served them all
    calls.clear()
    node = start_node()
    got = _send(node.port, paths)
    assert got == expected
    assert [status for status, _ in got][:2] == [0, 0]
    assert sorted(status for status, _ in got[2:]) == sorted(c[1] for c in BAD_CASES.values())
    # only the request whose SOP Instance UID is not digits and dots went to pynetdicom
    assert calls == ["1.2.3/../../etc/passwd"]
    assert len(_instances(node)) == len(_instances(reference)) == 1
    assert [p.name for p in (node.store_root / "tmp").iterdir()] == []


def test_pynetdicom_debug_logging_turns_the_inline_path_off(start_node, tmp_path, monkeypatch):
    calls = _scp_calls(monkeypatch)
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")  # a process's default
    logger.setLevel(logging.DEBUG)
    try:
        node = start_node()  # binds pynetdicom's handlers: they see every PDU and message
    finally:
        logger.setLevel(level)
    path = tmp_path / "one.dcm"
    ct_slice(generate_uid(), generate_uid(), 0).save_as(path, enforce_file_format=True)
    assert _send(node.port, [path]) == [(0, "")]
    assert len(calls) == 1
    assert len(_instances(node)) == 1
