"""Every real third-party DICOM file in ``CSPINE_REAL_DATA`` goes through the node.

The node is configured to accept every *standard* storage SOP class found in the
folder (besides CT), so broken SEG, SR, MR ... files reach the validator too; private
SOP classes are refused at negotiation, as with any class not configured. Each file
gets 0x0000, with its data set stored byte for byte (only the preamble and the file
meta group are the node's), or the refusal listed in :data:`REFUSED` with its reason;
after each file another peer's C-ECHO is answered.
"""

from __future__ import annotations

import fnmatch
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import _config
from pynetdicom.sop_class import StorageServiceClass, uid_to_service_class
from sqlalchemy import select

from config import load_settings
from dicom_node.receive import Receiver, open_node_storage
from dicom_node.scp import StorageNode
from dicom_node.validate import CT_STORAGE_SOP_CLASSES, valid_uid
from storage.models import Instance, QuarantinedInstance
from tests.conftest import free_port, real_data_dir
from tests.helpers import dataset_bytes
from tests.reliability.real_files import dicom_candidates, send_one, send_plan
from tests.reliability.test_receive_faults import assert_other_peer_served, latest_refusal

A900 = "0xA900"
# (file pattern, outcome, reason in the Error Comment): every refusal, and why it is right
REFUSED: list[tuple[str, str, str]] = [
    # anonymised with an empty (Type 1) SOPInstanceUID
    ("wasserth_TotalSegmentator/example_ct_dicom/*", A900, "SOPInstanceUID is missing"),
    # parse to nothing usable: zero elements, truncated, undefined-length / UN / private SQ
    ("fo-dicom/GH1339.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/UN_sequence.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/no_meta_group_length.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/priv_SQ.dcm", A900, "SOPInstanceUID is missing"),
    # no usable file meta: sent raw as implicit VR (a peer sending whatever it has)
    ("fo-dicom/GH340.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/ExplVR_BigEndNoMeta.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/empty_charset_LEI.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/meta_missing_tsyntax.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/nested_priv_SQ.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/no_meta.dcm", A900, "SOPInstanceUID is missing"),
    ("pydicom_test_files/ExplVR_LitEndNoMeta.dcm", A900, "SOPClassUID differs"),
    # file meta UID differs from the data set's SOPInstanceUID (sent as the Affected UID)
    ("fo-dicom/GH1146.dcm", A900, "SOPInstanceUID differs from the Affected"),
    ("fo-dicom/GH1376.dcm", A900, "SOPInstanceUID differs from the Affected"),
    ("pydicom_test_files/badVR.dcm", A900, "SOPInstanceUID differs from the Affected"),
    ("pydicom_test_files/rtplan_truncated.dcm", A900, "SOPInstanceUID differs from the Affected"),
    ("pylibjpeg-data/ELSCINT1_JP2vsJ2K.dcm", A900, "SOPInstanceUID differs from the Affected"),
    ("pylibjpeg-data/JPEGLossless_1s_1f_i_16_16_bad.dcm", A900, "SOPInstanceUID differs"),
    # required attributes missing or invalid
    ("fo-dicom/GH223.dcm", A900, "StudyInstanceUID is missing"),
    ("fo-dicom/GH487.dcm", A900, "StudyInstanceUID is missing"),
    ("fo-dicom/GH626.dcm", A900, "StudyInstanceUID is missing"),
    ("fo-dicom/multiframe.dcm", A900, "StudyInstanceUID is missing"),
    ("pydicom-data/bad_sequence.dcm", A900, "SOPInstanceUID is not a valid UID"),
    # an image SOP class without pixels, or fewer pixel bytes than Rows x Columns need
    ("QIICR_dcmqi/sr-tid1500-headneck-petct/rwvm.dcm", A900, "image has no Pixel Data"),
    ("fo-dicom/GH178.dcm", A900, "image has no Pixel Data"),
    ("fo-dicom/GH179A.dcm", A900, "image has no Pixel Data"),
    ("pydicom_test_files/MR_truncated.dcm", A900, "Pixel Data is truncated"),
    # transfer syntax not accepted (big endian, retired JPEG, deflated image frame)
    ("*_1.2.840.10008.1.2.2.dcm", "context-rejected", ""),
    ("*_1.2.840.10008.1.2.4.53.dcm", "context-rejected", ""),
    ("*_1.2.840.10008.1.2.4.55.dcm", "context-rejected", ""),
    ("fo-dicom/GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm", "context-rejected", ""),
    ("pydicom-data/liver_deflate.dcm", "context-rejected", ""),
    # private or unknown SOP classes are never accepted
    ("fo-dicom/GH220.dcm", "context-rejected", ""),
    ("fo-dicom/GH355.dcm", "context-rejected", ""),
    ("fo-dicom/Issue1097_FailToOpenDeflatedFileWithSQ.dcm", "context-rejected", ""),
    ("fo-dicom/genFile.dcm", "context-rejected", ""),
]

_ROOT = real_data_dir()
FILES = dicom_candidates(_ROOT) if _ROOT is not None and _ROOT.is_dir() else []


def expected(rel: str) -> tuple[str, str] | None:
    for pattern, outcome, reason in REFUSED:
        if fnmatch.fnmatch(rel, pattern):
            return outcome, reason
    return None


def _standard_storage_classes(root: Path, files: list[str]) -> list[str]:
    out = set()
    for rel in files:
        try:
            uid = str(read_file_meta_info(root / rel).MediaStorageSOPClassUID)
        except Exception:
            continue
        if valid_uid(uid) and uid_to_service_class(uid) is StorageServiceClass:
            out.add(uid)
    return sorted(out - set(CT_STORAGE_SOP_CLASSES))


@pytest.fixture(scope="module")
def real_node(real_data: Path) -> Iterator[tuple[StorageNode, Path]]:
    scratch = Path(tempfile.mkdtemp(prefix="cspine-real-"))
    old_tempdir, old_chunked = tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET
    settings = load_settings(
        overrides={
            "storage": {"data_dir": str(scratch / "var"), "min_free_bytes": 0},
            "node": {
                "port": free_port(),
                "extra_storage_sop_classes": _standard_storage_classes(real_data, FILES),
            },
        },
        environ={},
    )
    catalog, store = open_node_storage(settings)
    node = StorageNode(settings, Receiver(settings, catalog, store, environ={}))
    node.start()
    yield node, scratch
    node.stop()
    catalog.dispose()
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET = old_tempdir, old_chunked


def _stored_copies(node: StorageNode) -> dict[str, list[Path]]:
    root = node.receiver.store.root
    out: dict[str, list[Path]] = {}
    with node.receiver.catalog.read() as s:
        for uid, rel in s.execute(select(Instance.sop_instance_uid, Instance.file_path)):
            out.setdefault(uid, []).append(root / rel)
        for uid, rel in s.execute(
            select(QuarantinedInstance.sop_instance_uid, QuarantinedInstance.file_path)
        ):
            out.setdefault(uid, []).append(root / rel)
    return out


@pytest.mark.parametrize("rel", FILES or ["(no real-data folder)"])
def test_every_real_file_is_stored_exactly_or_refused_with_its_reason(real_data, real_node, rel):
    node, scratch = real_node
    path, sop_class, ts, _mode = send_plan(real_data / rel, scratch)
    newest = latest_refusal(node.receiver)
    before = newest.id if newest is not None else 0
    outcome, comment = send_one(node.port, path, sop_class, ts)
    refusal = expected(rel)
    if refusal is None:
        assert outcome == "0x0000", f"{rel}: {outcome} {comment}"
        uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
        sent = dataset_bytes(path)
        copies = _stored_copies(node).get(uid, [])
        # stored as received (a re-sent UID with other bytes lands in quarantine)
        assert any(dataset_bytes(p) == sent for p in copies), rel
        for copy in copies:
            assert copy.read_bytes()[:128] == b"\0" * 128  # zeroed preamble
    else:
        assert (outcome, comment.startswith(refusal[1])) == (refusal[0], True), (
            f"{rel}: {outcome} {comment}"
        )
        if outcome != "context-rejected":  # it reached the receiver: the reason is kept
            row = latest_refusal(node.receiver)
            assert row is not None and row.id > before and row.reason.startswith(refusal[1])
            assert f"0x{row.status:04X}" == outcome and row.calling_ae == "REALSCU"
    assert not list(node.receiver.store.tmp_dir.iterdir())  # nothing half-received
    assert_other_peer_served(node.port)


def test_refusal_table_names_only_files_that_exist(real_data):
    for pattern, _outcome, _reason in REFUSED:
        assert any(fnmatch.fnmatch(rel, pattern) for rel in FILES), pattern
