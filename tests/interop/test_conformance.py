"""What ``docs/conformance.md`` states about associations, contexts and statuses, on the wire.

Each test names the statement it backs: A-ASSOCIATE-RJ reasons, presentation-context
results and transfer-syntax choice, and the C-STORE statuses not produced elsewhere.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from dicom_node.receive import Receiver, open_node_storage
from dicom_node.scp import StorageNode
from dicom_node.validate import ACCEPTED_TRANSFER_SYNTAXES
from tests.dicom_node.conftest import make_settings
from tests.dicom_node.scu_tools import chunked_send, store_file
from tests.helpers import CT, MR, ct_slice

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE = (
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.2",
)
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_LOSSLESS_SV1, JPEG_BASELINE = "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Factory: an in-process SCP with the given settings sections."""
    nodes: list[StorageNode] = []
    old_tempdir, old_chunked = tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET

    def _start(**sections: dict) -> StorageNode:
        settings = make_settings(tmp_path, **sections)
        catalog, store = open_node_storage(settings)
        node = StorageNode(settings, Receiver(settings, catalog, store))
        node.start(block=False)
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop()
        node.receiver.catalog.dispose()
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET = old_tempdir, old_chunked


def _associate(
    port: int, contexts=((Verification, [IMPLICIT_LE]),), calling="TESTSCU", called="CSPINE"
):
    ae = AE(ae_title=calling)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def _reject_reason(assoc) -> tuple[int, int, int]:
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    return int(rsp.result), int(rsp.result_source), int(rsp.diagnostic)


def test_allow_list_and_called_ae_rejections(serve):
    node = serve(node={"peers": [{"ae_title": "GOODSCU", "host": "127.0.0.0/8"}]})
    # calling AE title not in the allow-list: rejected-permanent, service-user, reason 3
    assert _reject_reason(_associate(node.port, calling="EVILSCU")) == (1, 1, 3)
    # allowed AE title from an address outside its network: the same
    far = serve(node={"peers": [{"ae_title": "GOODSCU", "host": "10.99.0.0/16"}]})
    assert _reject_reason(_associate(far.port, calling="GOODSCU")) == (1, 1, 3)
    # called AE title is not the node's: rejected-permanent, service-user, reason 7
    assert _reject_reason(_associate(node.port, calling="GOODSCU", called="NOTME")) == (1, 1, 7)
    ok = _associate(node.port, calling="GOODSCU")
    assert ok.is_established
    assert ok.send_c_echo().Status == 0x0000
    ok.release()


def test_too_many_associations_is_a_transient_rejection(serve):
    node = serve(node={"max_associations": 1})
    first = _associate(node.port)
    assert first.is_established
    # rejected-transient, service-provider (presentation), local-limit-exceeded
    assert _reject_reason(_associate(node.port)) == (2, 3, 2)
    first.release()
    deadline = time.monotonic() + 10  # the server thread of the first one ends
    while (again := _associate(node.port)).is_rejected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert again.is_established
    again.release()


def test_presentation_context_results_and_transfer_syntax_choice(serve):
    node = serve()
    assoc = _associate(
        node.port,
        contexts=(
            (Verification, [IMPLICIT_LE]),
            (MR, [EXPLICIT_LE]),  # not a supported SOP class
            (CT, [EXPLICIT_BE]),  # supported class, no supported transfer syntax
            (CT, [IMPLICIT_LE, EXPLICIT_LE, JPEG_LOSSLESS_SV1]),
            (ENHANCED_CT, [IMPLICIT_LE, EXPLICIT_LE]),
            (CT, [IMPLICIT_LE, JPEG_BASELINE]),
            (SEG, [EXPLICIT_LE]),
        ),
    )
    assert assoc.is_established
    results = {}
    for cx in assoc.rejected_contexts + assoc.accepted_contexts:
        results[cx.context_id] = (cx.result, cx.transfer_syntax[0] if cx.result == 0 else None)
    assoc.release()
    ids = sorted(results)
    assert [results[i] for i in ids] == [
        (0x00, IMPLICIT_LE),
        (0x03, None),  # abstract-syntax-not-supported
        (0x04, None),  # transfer-syntaxes-not-supported
        (0x00, JPEG_LOSSLESS_SV1),  # the node's preference, not the order proposed
        (0x00, EXPLICIT_LE),
        (0x00, JPEG_BASELINE),  # lossy is preferred to implicit VR (stored as sent)
        (0x03, None),  # SEG is not accepted unless configured
    ]
    assert ACCEPTED_TRANSFER_SYNTAXES[-1] == IMPLICIT_LE


def test_extra_storage_sop_class_is_accepted_when_configured(serve):
    node = serve(node={"extra_storage_sop_classes": [SEG]})
    assoc = _associate(node.port, contexts=((SEG, [EXPLICIT_LE]),))
    assert assoc.is_established and [c.abstract_syntax for c in assoc.accepted_contexts] == [SEG]
    assoc.release()


def test_unparseable_dataset_gets_c210(serve, tmp_path):
    node = serve()
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    ds.file_meta.TransferSyntaxUID = DEFLATED
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    buf.write(b"this data set claims to be deflated but is not")
    path = tmp_path / "garbage.dcm"
    path.write_bytes(buf.getvalue())
    assoc = _associate(node.port, contexts=((CT, [DEFLATED]),))
    assert assoc.is_established
    with chunked_send():  # the bytes go out as they are
        rsp = assoc.send_c_store(path)
    assoc.release()
    assert rsp.Status == 0xC210
    assert "cannot be parsed" in rsp.ErrorComment


def test_image_over_the_pixel_limit_gets_a700(serve, tmp_path):
    node = serve(node={"max_pixels": 32 * 32 - 1})
    ds = ct_slice(generate_uid(), generate_uid(), 0, rows=32, cols=32)
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    rsp = store_file(node.port, path)
    assert rsp is not None and rsp.Status == 0xA700
    assert "pixel limit" in rsp.ErrorComment


def test_private_storage_class_is_stored_when_configured(serve, tmp_path):
    private = "1.2.826.0.1.3680043.8.498.1.424242"
    node = serve(node={"extra_storage_sop_classes": [private]})
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = private
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    assoc = _associate(node.port, contexts=((private, [EXPLICIT_LE]),))
    assert assoc.is_established
    rsp = assoc.send_c_store(path)
    assoc.release()
    assert rsp.Status == 0x0000
