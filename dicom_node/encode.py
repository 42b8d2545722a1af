"""DICOM Part-10 bytes of an output with one copy of its Pixel Data.

pydicom has no way to write a dataset without copying each element value through a
temporary buffer; for a SEG of 0.3 GB that is three copies at once. :func:`encode`
lets pydicom write everything but a trailing native Pixel Data element, then appends
that element by reference (the tag, VR and length header are the only bytes written
here), so the whole file costs one copy. The result is byte-identical to
``ds.save_as(..., enforce_file_format=True)`` (tested against it).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filewriter import correct_ambiguous_vr_element

_PIXEL_DATA = 0x7FE00010


class _Chunks(io.RawIOBase):
    """A write-only file that keeps references to the written buffers.

    pydicom writes the Pixel Data value with one ``write`` call; a ``BytesIO`` would
    copy it in and grow by reallocation (at times two copies of a 0.3 GB SEG). Here
    the value is only referenced, and :meth:`join` copies everything once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes | memoryview] = []
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        part = data if isinstance(data, bytes) else bytes(data)
        self._parts.append(part)
        self._size += len(part)
        return len(part)

    def tell(self) -> int:
        return self._size

    def join(self) -> bytes:
        """All written bytes in one buffer; the parts are released."""
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def _appendable_pixel_data(ds: pydicom.Dataset) -> DataElement | None:
    """The Pixel Data element when it is native, explicit VR little endian and last."""
    found: DataElement | RawDataElement | None = ds.get(_PIXEL_DATA)
    if found is not None and found.VR == "OB or OW":  # as pydicom resolves it when writing
        found = correct_ambiguous_vr_element(found, ds, True)
    if not isinstance(found, DataElement):
        return None
    elem = found
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    fast = (
        elem.VR in ("OB", "OW")
        and isinstance(elem.value, bytes)
        and syntax == pydicom.uid.ExplicitVRLittleEndian
        and int(max(ds.keys())) == _PIXEL_DATA
    )
    return elem if fast else None


def encode(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a DICOM file, the bytes ``ds.save_as(..., enforce_file_format=True)`` writes."""
    out = _Chunks()
    elem = _appendable_pixel_data(ds)
    if elem is None:
        ds.save_as(out, enforce_file_format=True)
        return out.join()
    del ds[_PIXEL_DATA]
    try:
        ds.save_as(out, enforce_file_format=True)
    finally:
        ds[_PIXEL_DATA] = elem
    value: bytes = elem.value
    pad = len(value) % 2
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, elem.VR.encode(), 0, len(value) + pad))
    out.write(value)
    if pad:
        out.write(b"\x00")
    return out.join()
