"""Checks every received instance must pass before it is acknowledged.

:func:`inspect_file` reads the header of a stored-as-received file without loading
pixel data, checks it, and returns the identifying attributes, or raises
:class:`Rejection` carrying the DIMSE status to answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from ai.compression import is_lossy
from config.settings import NodeSettings
from storage import InstanceHeader

# DIMSE C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

DEFLATED = DeflatedExplicitVRLittleEndian
CT_STORAGE_SOP_CLASSES: tuple[UID, ...] = (CTImageStorage, EnhancedCTImageStorage)
"""The SOP classes the node stores and processes as CT (extras come from the settings)."""

LOSSLESS_TRANSFER_SYNTAXES: tuple[str, ...] = (
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLossless,  # process 14, 1.2.840.10008.1.2.4.57
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    RLELossless,  # 1.2.840.10008.1.2.5
    ExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1
    DeflatedExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1.99
    ImplicitVRLittleEndian,  # 1.2.840.10008.1.2
)
ACCEPTED_LOSSY_TRANSFER_SYNTAXES: tuple[str, ...] = (
    JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    JPEG2000,  # may be lossy, 1.2.840.10008.1.2.4.91
    JPEGBaseline8Bit,  # 1.2.840.10008.1.2.4.50
    JPEGExtended12Bit,  # 1.2.840.10008.1.2.4.51
)
"""The lossy syntaxes the node accepts; which syntaxes are lossy is :mod:`ai.compression`'s."""
# Acceptor preference order (pynetdicom picks the first of ours that the peer proposed):
# lossless compressed first (a peer proposes those only for data it holds compressed, so
# it is stored as the peer holds it), then explicit little endian, deflated, the lossy
# syntaxes, and implicit VR last.
ACCEPTED_TRANSFER_SYNTAXES = (
    LOSSLESS_TRANSFER_SYNTAXES[:-1]
    + ACCEPTED_LOSSY_TRANSFER_SYNTAXES
    + LOSSLESS_TRANSFER_SYNTAXES[-1:]
)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_LOOSE_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Rejection(Exception):
    """An instance is refused; ``status`` is the DIMSE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def valid_uid(value: object) -> bool:
    """Whether ``value`` is a syntactically valid UID: digits and dots, at most 64 chars.

    Components with leading zeros are tolerated (they occur in the wild); anything
    else — letters, slashes, ``..``, NUL, spaces inside — is refused.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_LOOSE_RE.match(value))


@dataclass(frozen=True)
class Limits:
    """Size limits applied before anything is allocated."""

    max_pixels: int = 512 * 1024 * 1024
    max_instance_bytes: int = 2 * 1024**3

    @classmethod
    def of(cls, node: NodeSettings) -> Limits:
        """The limits of the ``[node]`` settings."""
        return cls(max_pixels=node.max_pixels, max_instance_bytes=node.max_instance_bytes)


_TAGS = {
    keyword: (int(Tag(keyword)), dictionary_VR(keyword))
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "SamplesPerPixel",
        "NumberOfFrames",
        "SeriesNumber",
        "InstanceNumber",
        "Modality",
        "StudyDate",
        "LossyImageCompression",
    )
}
"""Attributes :func:`_get` may decode from their raw bytes: tag and dictionary VR
(pydicom's data dictionary; each VR is one of :data:`_PLAIN_TEXT`'s or US)."""

_PLAIN_TEXT = {
    "UI": re.compile(r"[0-9]+(\.[0-9]+)*"),
    "IS": re.compile(r"[+-]?[0-9]{1,12}"),
    "CS": re.compile(r"[A-Z0-9_]{1,16}"),
    "DA": re.compile(r"[0-9]{8}"),
}
"""Single values that pydicom would return exactly as written (less trailing padding)."""


def _get(ds: pydicom.Dataset, keyword: str, default: object = None) -> object:
    """``ds.get(keyword, default)``, without pydicom's conversion for plain values.

    pydicom converts an element on first access: a dictionary look-up, hooks, the
    value's conversion and validation (a regular expression per UID), a new
    element stored back; about a third of the header check. For the attributes in
    :data:`_TAGS`, a raw little-endian element of the dictionary VR (or implicit) whose
    value is plain (one US, or one value matching :data:`_PLAIN_TEXT` after the trailing
    NUL or spaces pydicom strips as well) is decoded here, to what pydicom returns for
    it: ``int`` for US and IS, ``str`` otherwise. An empty value is ``None``, which the
    callers treat as pydicom's empty value. Everything else (another VR, big endian, a
    multi-value, odd characters, a deferred value) goes through ``ds.get``.
    ``tests/dicom_node/test_validate.py`` compares the two on crafted values.
    """
    tag, vr = _TAGS[keyword]
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return default
    value = getattr(elem, "value", None)
    if (
        isinstance(elem, RawDataElement)  # not yet converted
        and elem.VR in (None, vr)
        and elem.is_little_endian
        and isinstance(value, bytes)
    ):
        if not value:
            return None
        if vr == "US":
            if len(value) == 2:
                return value[0] | value[1] << 8
        else:
            text = value.rstrip(b"\0 ")
            if not text:
                return None
            try:
                plain = text.decode("ascii")
            except UnicodeDecodeError:
                plain = ""
            if _PLAIN_TEXT[vr].fullmatch(plain):
                return int(plain) if vr == "IS" else plain
    return ds.get(keyword, default)


def _uid(ds: pydicom.Dataset, keyword: str) -> str:
    return _checked_uid(_get(ds, keyword), keyword)


def _file_meta_uid(meta: pydicom.Dataset, keyword: str) -> str:
    return _checked_uid(meta.get(keyword), keyword)


def _checked_uid(value: object, keyword: str) -> str:
    if value is None or str(value).strip("\0 ") == "":
        raise Rejection(DATASET_MISMATCH, f"{keyword} is missing")
    text = str(value).rstrip("\0 ")
    if not valid_uid(text):
        raise Rejection(DATASET_MISMATCH, f"{keyword} is not a valid UID")
    return text


def _int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = _get(ds, keyword, default)
    if value is None or value == "":
        raise Rejection(DATASET_MISMATCH, f"{keyword} is missing")
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise Rejection(DATASET_MISMATCH, f"{keyword} is not an integer") from exc


def _check_pixels(ds: pydicom.Dataset, file_size: int, ts: UID, limits: Limits) -> None:
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    if raw is None:
        raise Rejection(DATASET_MISMATCH, "image has no Pixel Data")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits_alloc, bits_stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    samples = _int(ds, "SamplesPerPixel", 1)
    frames = _int(ds, "NumberOfFrames", 1)
    if rows < 1 or cols < 1 or frames < 1:
        raise Rejection(DATASET_MISMATCH, "Rows, Columns and NumberOfFrames must be positive")
    if bits_alloc not in (1, 8, 16, 32) or not 1 <= bits_stored <= bits_alloc:
        raise Rejection(DATASET_MISMATCH, "BitsAllocated/BitsStored are not sane")
    if samples not in (1, 3):
        raise Rejection(DATASET_MISMATCH, "SamplesPerPixel must be 1 or 3")
    if rows * cols * frames > limits.max_pixels:
        raise Rejection(
            OUT_OF_RESOURCES, f"image of {rows}x{cols}x{frames} exceeds the pixel limit"
        )
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if ts.is_compressed:
        if length not in (None, 0xFFFFFFFF):
            raise Rejection(DATASET_MISMATCH, "compressed Pixel Data must be encapsulated")
        return
    expected = (rows * cols * frames * samples * bits_alloc + 7) // 8
    if length is None:  # already read: measure the value
        length = len(ds.PixelData)
        tell = 0
    if length not in (expected, expected + 1):
        raise Rejection(
            DATASET_MISMATCH,
            f"Pixel Data holds {length} bytes; Rows x Columns x bits need {expected}",
        )
    # A deflated data set is inflated in memory: its offsets say nothing about the file.
    if ts != DEFLATED and tell is not None and tell and tell + length > file_size:
        raise Rejection(DATASET_MISMATCH, "Pixel Data is truncated")


def inspect_file(
    path: Path,
    *,
    affected_sop_instance_uid: str | None,
    affected_sop_class_uid: str | None,
    limits: Limits = Limits(),
) -> InstanceHeader:
    """Check a received file and return its identifying attributes.

    Parameters
    ----------
    path
        The instance in DICOM file format, as received.
    affected_sop_instance_uid, affected_sop_class_uid
        From the C-STORE request; ``None`` for files imported from disk.
    limits
        Pixel-count limit applied before any allocation.

    Raises
    ------
    Rejection
        With 0xC210 when the file cannot be parsed, 0xA900 when the dataset does not
        match its SOP class or the request, 0xA700 when it exceeds a resource limit.
    """
    file_size = path.stat().st_size
    if file_size > limits.max_instance_bytes:
        raise Rejection(OUT_OF_RESOURCES, "instance exceeds the size limit")
    try:
        ds = pydicom.dcmread(path, defer_size=4096)
        ts = UID(ds.file_meta.TransferSyntaxUID)
        sop_class = _file_meta_uid(ds.file_meta, "MediaStorageSOPClassUID")
        ds_class = _get(ds, "SOPClassUID")
        if ds_class is not None and str(ds_class).strip() and str(ds_class).strip() != sop_class:
            raise Rejection(DATASET_MISMATCH, "SOPClassUID differs from the file meta / request")
        sop_uid = _uid(ds, "SOPInstanceUID")
        study_uid = _uid(ds, "StudyInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
    except Rejection:
        raise
    except (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError, EOFError) as exc:
        raise Rejection(
            CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}"
        ) from exc
    except Exception as exc:  # pydicom raises many types on hostile input
        raise Rejection(
            CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}"
        ) from exc
    if affected_sop_instance_uid is not None and sop_uid != affected_sop_instance_uid.rstrip("\0 "):
        raise Rejection(
            DATASET_MISMATCH, "SOPInstanceUID differs from the Affected SOP Instance UID"
        )
    if affected_sop_class_uid is not None and sop_class != affected_sop_class_uid.rstrip("\0 "):
        raise Rejection(DATASET_MISMATCH, "SOP class differs from the Affected SOP Class UID")
    is_image = "PixelData" in ds or sop_class.startswith("1.2.840.10008.5.1.4.1.1.")
    if is_image and not sop_class.startswith("1.2.840.10008.5.1.4.1.1.88"):
        try:
            _check_pixels(ds, file_size, ts, limits)
        except Rejection:
            raise
        except Exception as exc:
            raise Rejection(CANNOT_UNDERSTAND, f"image attributes unreadable: {exc}") from exc

    def text(keyword: str, size: int) -> str | None:
        value = _get(ds, keyword) if keyword in _TAGS else ds.get(keyword)
        return None if value in (None, "") else str(value)[:size]

    def number(keyword: str) -> int | None:
        try:
            value = _get(ds, keyword)
            return None if value in (None, "") else int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return None

    return InstanceHeader(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(ts),
        modality=text("Modality", 16),
        series_number=number("SeriesNumber"),
        series_description=text("SeriesDescription", 64),
        instance_number=number("InstanceNumber"),
        study_date=text("StudyDate", 8),
        study_description=text("StudyDescription", 64),
        lossy=is_lossy(ts, _get(ds, "LossyImageCompression")),
    )
