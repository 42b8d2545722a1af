"""The header check's reading of raw values, against pydicom's own conversion."""

from __future__ import annotations

import struct
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node import validate
from tests.helpers import CT

VALUES = {
    "UI": [
        b"1.2.3\0",
        b"1.2.3",
        b"1.2.3 ",
        b" 1.2.3",
        b"1.2.3\\4.5",
        b"",
        b"\0\0",
        b"1.2.a",
        b"\xe91.2",
        b"1..2",
        b"01.2",
        b"1.2" * 30,
    ],
    "US": [struct.pack("<H", 512), struct.pack("<H", 0), b"", struct.pack("<HH", 1, 2)],
    "IS": [
        b"12",
        b" 12 ",
        b"+3",
        b"-4",
        b"0012",
        b"1.0",
        b"1.5",
        b"1\\2",
        b"",
        b"abc",
        b"1e3",
        b"9" * 13,
    ],
    "CS": [b"CT", b"CT ", b"ct", b"C T", b"01", b"", b"\xe9T", b"A" * 18],
    "DA": [b"20240101", b"2024-01-01", b"", b"2024010 ", b"20240101\\20240102"],
}
ODD_VRS = {"UI": b"LO", "US": b"SS", "IS": b"LO", "CS": b"LO", "DA": b"LO"}


def _element(tag: int, vr: bytes | None, value: bytes) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if vr is None:  # implicit VR little endian
        return struct.pack("<HHI", group, element, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _file(tmp_path: Path, tag: int, vr: bytes | None, value: bytes) -> Path:
    """A Part-10 file whose data set holds the one element, encoded by hand."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = "1.2.3"
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if vr is None else ExplicitVRLittleEndian
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)  # type: ignore[arg-type]
    buf.write(_element(tag, vr, value))
    path = tmp_path / "one.dcm"
    path.write_bytes(buf.getvalue())
    return path


def _as_used(value: object, vr: str) -> object:
    """What the header check makes of a value: an int for numbers, text otherwise."""
    if value is None or value == "":
        return None
    if vr in ("US", "IS"):
        try:
            return int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError) as exc:
            return type(exc)
    return str(value)


CASES = [
    (keyword, vr_in_file, value)
    for keyword, (_, vr) in validate._TAGS.items()
    for vr_in_file in (vr.encode(), None, ODD_VRS[vr])
    for value in VALUES[vr]
]


@pytest.mark.parametrize(("keyword", "vr_in_file", "value"), CASES)
def test_raw_values_read_as_pydicom_reads_them(tmp_path, keyword, vr_in_file, value):
    tag, vr = validate._TAGS[keyword]
    path = _file(tmp_path, tag, vr_in_file, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd values
        ours = validate._get(pydicom.dcmread(path), keyword)
        theirs = pydicom.dcmread(path).get(keyword)
    assert _as_used(ours, vr) == _as_used(theirs, vr)


def test_absent_attributes_give_the_default(tmp_path):
    path = _file(tmp_path, 0x00100020, b"LO", b"X")
    ds = pydicom.dcmread(path)
    assert validate._get(ds, "Rows") is None
    assert validate._get(ds, "SamplesPerPixel", 1) == 1
