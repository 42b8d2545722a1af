"""The direct C-STORE success response: the same bytes as pynetdicom's own encoding."""

from __future__ import annotations

import pytest
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.store_rsp import _plain, encode_store_success


def _pynetdicom_bytes(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 16382))
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[:1] == b"\x03"  # one last command fragment
    return pdv[1:]


@pytest.mark.parametrize("message_id", [1, 2, 65535])
@pytest.mark.parametrize("instance_uid", ["1.2.3.4", "1.2.3.45", generate_uid()])
def test_bytes_match_pynetdicom(message_id, instance_uid):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = instance_uid
    rsp.Status = 0x0000
    assert _plain(rsp)
    assert encode_store_success(message_id, CTImageStorage, instance_uid) == _pynetdicom_bytes(rsp)


def test_anything_but_a_plain_success_goes_through_pynetdicom():
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xA900
    assert not _plain(rsp)  # a failure status
    rsp.Status = 0x0000
    rsp.ErrorComment = "note"
    assert not _plain(rsp)  # an extra attribute
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.3"
    assert not _plain(request)  # a request
