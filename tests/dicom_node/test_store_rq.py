"""The direct spool writer of C-STORE requests against pynetdicom's own."""

from __future__ import annotations

import os
from io import BytesIO

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta

from dicom_node import store_rq

CT = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom(sop_class: object, sop_instance: object, syntax: object) -> bytes:
    buf = BytesIO()
    buf.write(b"\x00" * 128)
    buf.write(b"DICM")
    write_file_meta_info(
        buf,  # type: ignore[arg-type]
        create_file_meta(
            sop_class_uid=sop_class,  # type: ignore[arg-type]
            sop_instance_uid=sop_instance,  # type: ignore[arg-type]
            transfer_syntax=syntax,  # type: ignore[arg-type]
        ),
    )
    return buf.getvalue()


@pytest.mark.parametrize(
    "sop_instance",
    ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.77." + "9" * 35, "1." + "2" * 62],
)
@pytest.mark.parametrize(
    "syntax",
    ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5"],
)
def test_file_meta_is_byte_identical(sop_instance: str, syntax: str) -> None:
    ours = store_rq.file_meta_bytes(UID(CT), UID(sop_instance), UID(syntax))
    assert ours == _pynetdicom(UID(CT), UID(sop_instance), UID(syntax))
    meta = pydicom.dcmread(BytesIO(ours + b"\x08\x00\x16\x00"), stop_before_pixels=True)
    assert meta.file_meta.MediaStorageSOPInstanceUID == sop_instance


@pytest.mark.parametrize(
    "odd", [None, "", "1.2.\u00e9", "1.2.3\0", "1.2.3 ", " 1.2", "abc", "1." + "2" * 70]
)
def test_odd_values_go_through_pydicom(odd: object) -> None:
    try:
        expected = _pynetdicom(UID(CT), odd, UID("1.2.840.10008.1.2.1"))
    except Exception as exc:  # what pydicom refuses, we refuse with the same error
        with pytest.raises(type(exc)):
            store_rq.file_meta_bytes(UID(CT), odd, UID("1.2.840.10008.1.2.1"))
        return
    assert store_rq.file_meta_bytes(UID(CT), odd, UID("1.2.840.10008.1.2.1")) == expected


def test_spool_files_are_exclusive_and_private(tmp_path: os.PathLike[str]) -> None:
    first = store_rq.open_spool(str(tmp_path))
    second = store_rq.open_spool(str(tmp_path))
    try:
        assert first.name != second.name
        first.write(memoryview(b"abc" * 100_000)[1:])
        assert os.stat(first.name).st_size == 299_999
        assert os.stat(first.name).st_mode & 0o777 == 0o600
        assert first
    finally:
        first.close()
        first.close()  # twice: a no-op
        second.close()
