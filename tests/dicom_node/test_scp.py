"""Storage SCP over real loopback associations."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from storage.models import Instance, QuarantinedInstance, Series, Study, StudyState
from tests.conftest import ENGINES
from tests.dicom_node.scu_tools import associate, cut_off_store, store_file, store_files
from tests.helpers import MR, ct_slice, dataset_bytes, lenient_writing, write_series


def _instances(node) -> list[Instance]:
    with node.receiver.catalog.read() as s:
        return list(s.scalars(select(Instance)))


def _store_files(node) -> list[Path]:
    root = node.store_root
    return [p for p in (root / "instances").rglob("*") if p.is_file()]


def _tmp_files(node) -> list[Path]:
    return [p for p in (node.store_root / "tmp").iterdir()]


@pytest.mark.parametrize("node", ENGINES, indirect=True)
def test_store_series_byte_identical_and_cataloged(node, tmp_path):
    paths = write_series(tmp_path / "in", 6)
    statuses = store_files(node.port, paths)
    assert statuses == [0] * 6
    rows = _instances(node)
    assert len(rows) == 6
    sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in paths}
    for row in rows:
        stored = node.store_root / row.file_path
        assert stored.is_file()
        # the data set is stored exactly as received
        assert dataset_bytes(stored) == dataset_bytes(sent[row.sop_instance_uid])
        assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert row.calling_ae == "TESTSCU"
        # zeroed preamble, not executable, not world readable
        assert stored.read_bytes()[:128] == b"\0" * 128
        assert stored.stat().st_mode & 0o777 == 0o640
    with node.receiver.catalog.read() as s:
        study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).one()
        assert study.instance_count == 6 and series.instance_count == 6
        assert study.state is StudyState.RECEIVING
        assert series.modality == "CT" and not series.lossy
    assert _tmp_files(node) == []


def test_file_paths_never_come_from_uids(node, tmp_path):
    paths = write_series(tmp_path / "in", 1)
    assert store_files(node.port, paths) == [0]
    (row,) = _instances(node)
    assert row.sop_instance_uid not in row.file_path
    assert Path(row.file_path).stem == row.sha256


def test_dcmtk_echoscu_and_storescu_folder_with_jpeg_lossless(node, tmp_path):
    echo = subprocess.run(
        ["echoscu", "-aec", "CSPINE", "127.0.0.1", str(node.port)], capture_output=True, text=True
    )
    assert echo.returncode == 0, echo.stderr
    plain = write_series(tmp_path / "plain", 4, rows=64, cols=64)
    jpeg_dir = tmp_path / "jpeg"
    jpeg_dir.mkdir()
    for i, path in enumerate(write_series(tmp_path / "raw", 4, rows=64, cols=64)):
        subprocess.run(["dcmcjpeg", "+e1", str(path), str(jpeg_dir / f"j{i}.dcm")], check=True)
    assert pydicom.dcmread(jpeg_dir / "j0.dcm").file_meta.TransferSyntaxUID == (
        "1.2.840.10008.1.2.4.70"
    )
    run = subprocess.run(
        [
            "storescu",
            "-aec",
            "CSPINE",
            "-xs",
            "+sd",
            "+r",
            "127.0.0.1",
            str(node.port),
            str(tmp_path / "plain"),
            str(jpeg_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    rows = _instances(node)
    assert len(rows) == len(plain) + 4
    by_uid = {r.sop_instance_uid: r for r in rows}
    for path in plain:  # plain files arrive uncompressed; pixels survive the round trip
        ds = pydicom.dcmread(path)
        row = by_uid[ds.SOPInstanceUID]
        assert row.transfer_syntax_uid in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        stored = pydicom.dcmread(node.store_root / row.file_path)
        assert (stored.pixel_array == ds.pixel_array).all()
    for path in jpeg_dir.iterdir():  # compressed files are stored as sent, not transcoded
        ds = pydicom.dcmread(path)
        row = by_uid[ds.SOPInstanceUID]
        assert row.transfer_syntax_uid == "1.2.840.10008.1.2.4.70"
        assert dataset_bytes(node.store_root / row.file_path) == dataset_bytes(path)


def test_dcmtk_storescu_real_ct_files(node, real_data):
    tilt = real_data / "neurolabusc_dcm_qa_ct" / "GE_HiSpeed_head_gantry_tilt"
    jpeg_lossless = real_data / "fo-dicom" / "IM-0001-0001-0001.dcm"
    run = subprocess.run(
        [
            "storescu",
            "-aec",
            "CSPINE",
            "-xs",
            "+sd",
            "+r",
            "127.0.0.1",
            str(node.port),
            str(tilt),
            str(jpeg_lossless),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    rows = _instances(node)
    expected = len(list(tilt.glob("*.dcm"))) + 1
    assert len(rows) == expected
    by_uid = {r.sop_instance_uid: r for r in rows}
    ds = pydicom.dcmread(jpeg_lossless)
    stored = node.store_root / by_uid[ds.SOPInstanceUID].file_path
    assert by_uid[ds.SOPInstanceUID].transfer_syntax_uid == "1.2.840.10008.1.2.4.70"
    assert dataset_bytes(stored) == dataset_bytes(jpeg_lossless)
    assert stored.read_bytes()[:132] == b"\0" * 128 + b"DICM"  # zeroed preamble


def _bad(tmp_path: Path, mutate) -> Path:
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    mutate(ds)
    path = tmp_path / "bad.dcm"
    with lenient_writing():
        ds.preamble = b"\0" * 128
        ds.save_as(path, enforce_file_format=False)  # keep the crafted file meta as is
    return path


def _set_sop_uid(value: str):
    def mutate(ds):
        ds.SOPInstanceUID = value
        ds.file_meta.MediaStorageSOPInstanceUID = value

    return mutate


BAD_CASES = {
    "uid-with-dot-dot-slash": (_set_sop_uid("1.2.3/../../etc/passwd"), 0xA900, "not a valid UID"),
    "uid-65-chars": (
        lambda ds: setattr(ds, "StudyInstanceUID", "1." + "2" * 63),
        0xA900,
        "StudyInstanceUID is not a valid UID",
    ),
    "mismatched-affected-uid": (
        lambda ds: setattr(ds.file_meta, "MediaStorageSOPInstanceUID", generate_uid()),
        0xA900,
        "Affected SOP Instance UID",
    ),
    "missing-pixel-data": (lambda ds: delattr(ds, "PixelData"), 0xA900, "no Pixel Data"),
    "rows-larger-than-data": (lambda ds: setattr(ds, "Rows", 512), 0xA900, "Pixel Data holds"),
    "missing-series-uid": (lambda ds: delattr(ds, "SeriesInstanceUID"), 0xA900, "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gets_status_and_nothing_stored(node, tmp_path, case):
    mutate, status, comment = BAD_CASES[case]
    rsp = store_file(node.port, _bad(tmp_path, mutate))
    assert rsp is not None
    assert rsp.Status == status
    assert comment in rsp.ErrorComment
    assert _instances(node) == []
    assert _store_files(node) == []
    assert _tmp_files(node) == []
    # nothing ever lands outside the store
    assert not Path("/etc/passwd.dcm").exists()


def test_mr_context_rejected_at_negotiation(node):
    assoc = associate(node.port, sop_class=MR)
    assert assoc.is_established  # Verification is still accepted
    mr = [c for c in assoc.rejected_contexts if c.abstract_syntax == MR]
    assert mr and not [c for c in assoc.accepted_contexts if c.abstract_syntax == MR]
    assoc.release()


def test_unknown_calling_ae_rejected_when_peers_configured(start_node, tmp_path):
    running = start_node(node={"peers": [{"ae_title": "GOODSCU", "host": "127.0.0.0/8"}]})
    bad = associate(running.port, calling="EVILSCU")
    assert bad.is_rejected
    good = associate(running.port, calling="GOODSCU")
    assert good.is_established
    good.release()


def test_wrong_called_ae_rejected(node):
    assoc = associate(node.port, called="NOTME")
    assert assoc.is_rejected


@pytest.mark.parametrize("node", ENGINES, indirect=True)
def test_identical_duplicate_is_noop_and_changed_content_quarantined(node, tmp_path):
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    first = tmp_path / "a.dcm"
    ds.save_as(first, enforce_file_format=True)
    assert store_file(node.port, first).Status == 0
    assert store_file(node.port, first).Status == 0
    assert len(_instances(node)) == 1
    ds.PixelData = bytes(len(ds.PixelData))
    second = tmp_path / "b.dcm"
    ds.save_as(second, enforce_file_format=True)
    assert store_file(node.port, second).Status == 0
    (row,) = _instances(node)
    assert dataset_bytes(node.store_root / row.file_path) == dataset_bytes(first)
    with node.receiver.catalog.read() as s:
        (q,) = s.scalars(select(QuarantinedInstance))
        study = s.scalars(select(Study)).one()
    assert study.flagged and "different content" in study.flag_reason
    assert dataset_bytes(node.store_root / q.file_path) == dataset_bytes(second)


@pytest.mark.parametrize("node", ENGINES, indirect=True)
def test_same_uid_in_another_series_is_refused(node, tmp_path):
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    a = tmp_path / "a.dcm"
    ds.save_as(a, enforce_file_format=True)
    assert store_file(node.port, a).Status == 0
    ds.SeriesInstanceUID = generate_uid()
    b = tmp_path / "b.dcm"
    ds.save_as(b, enforce_file_format=True)
    rsp = store_file(node.port, b)
    assert rsp.Status == 0xA900
    assert len(_instances(node)) == 1


def test_low_disk_space_gives_a700_before_writing(node, tmp_path):
    node.receiver._free_bytes = lambda: 10
    object.__setattr__(node.receiver.settings.storage, "min_free_bytes", 1000)
    paths = write_series(tmp_path / "in", 1)
    rsp = store_file(node.port, paths[0])
    assert rsp.Status == 0xA700
    assert _instances(node) == [] and _store_files(node) == [] and _tmp_files(node) == []


@pytest.mark.parametrize("node", ENGINES, indirect=True)
def test_cut_off_transfer_leaves_no_partial_file_or_row(node):
    ds = ct_slice(generate_uid(), generate_uid(), 0, rows=256, cols=256)
    cut_off_store(node.port, ds, fraction=0.5)
    # wait for the node to handle the close (its handler discards the spool), not for
    # the spool to vanish: a spool not yet created would pass that wait at once
    counts = node.node.connections
    assert counts.opened == 1
    deadline = time.monotonic() + 10
    while counts.open and time.monotonic() < deadline:
        time.sleep(0.02)
    assert counts.open == 0, "the node did not notice the vanished peer"
    assert _tmp_files(node) == []
    assert _instances(node) == [] and _store_files(node) == []
    # and the node keeps serving
    echo = associate(node.port)
    assert echo.is_established
    assert echo.send_c_echo().Status == 0
    echo.release()


@pytest.mark.parametrize("node", ENGINES, indirect=True)
def test_study_over_two_associations_and_two_senders_is_one_study(node, tmp_path):
    study_uid = generate_uid()
    a = write_series(tmp_path / "a", 3, study_uid=study_uid)
    b = write_series(tmp_path / "b", 2, study_uid=study_uid)
    assert store_files(node.port, a, calling="SCANNER1") == [0, 0, 0]
    assert store_files(node.port, b, calling="SCANNER2") == [0, 0]
    with node.receiver.catalog.read() as s:
        (study,) = s.scalars(select(Study))
        assert study.instance_count == 5 and len(study.series) == 2


def test_store_dir_permissions(node):
    mode = os.stat(node.store_root).st_mode & 0o777
    assert mode & 0o007 == 0
