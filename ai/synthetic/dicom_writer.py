"""Write synthetic studies as DICOM CT series (complete headers) in four transfer syntaxes.

Pixel storage: unsigned 12-bit (BitsStored 12, RescaleIntercept -1024) as many scanners
write; the RSNA writer (:mod:`ai.synthetic.rsna_writer`) stores signed 16-bit instead, as
the RSNA files do. Encoders: RLE and JPEG 2000 lossless through pydicom
(``Dataset.compress``; pylibjpeg-rle / pylibjpeg-openjpeg, pydicom's native RLE as a
fallback); JPEG Lossless SV1 through GDCM (python-gdcm's ``ImageChangeTransferSyntax``,
:func:`encode_jpeg_lossless`) because pydicom has no encoder for it.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import gdcm
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)

from ai.synthetic.generate import sop_uid_for
from ai.synthetic.spec import ExtraSeries, SyntheticStudy

logger = logging.getLogger(__name__)

TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": str(ExplicitVRLittleEndian),
    "jpeg-lossless": str(JPEGLosslessSV1),
    "j2k-lossless": str(JPEG2000Lossless),
    "rle": str(RLELossless),
}
"""Names accepted by the writers and the UIDs they write."""

MANUFACTURER = "cspine-node"
MODEL = "SYNTHETIC PHANTOM"


def resolve_transfer_syntax(name_or_uid: str) -> str:
    """Map a writer name (``explicit``, ``jpeg-lossless``, ``j2k-lossless``, ``rle``) or UID.

    Raises
    ------
    ValueError
        For anything else.
    """
    if name_or_uid in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[name_or_uid]
    if name_or_uid in TRANSFER_SYNTAXES.values():
        return name_or_uid
    raise ValueError(
        f"transfer syntax must be one of {sorted(TRANSFER_SYNTAXES)} (or their UIDs), "
        f"got {name_or_uid!r}"
    )


def _ds(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.10g}"[:16]
    return text


def orientation_of(affine: np.ndarray) -> tuple[list[float], list[float], float, float]:
    """ImageOrientationPatient (row, column cosines) and (row, column) spacing of an affine."""
    col_step, row_step = affine[:3, 1], affine[:3, 2]
    dy, dx = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    row_dir = [float(round(v, 6)) + 0.0 for v in row_step / dx]
    col_dir = [float(round(v, 6)) + 0.0 for v in col_step / dy]
    return row_dir, col_dir, dy, dx


def encode_jpeg_lossless(pixels: np.ndarray, bits_stored: int) -> bytes:
    """One JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) frame of a 16-bit image, by GDCM.

    Parameters
    ----------
    pixels
        ``[row, column]`` int16 (signed) or uint16 (unsigned) stored values.
    bits_stored
        BitsStored of the image (BitsAllocated is 16, HighBit ``bits_stored - 1``).

    Returns
    -------
    bytes
        The JPEG codestream (SOI to EOI, padded to even length), one fragment's value.

    Raises
    ------
    ValueError
        For an image that is not 2-D 16-bit.
    RuntimeError
        When GDCM does not encode it.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.int16, np.uint16):
        raise ValueError(f"need a 2-D int16 or uint16 image, got {pixels.dtype} {pixels.shape}")
    rows, cols = pixels.shape
    # GDCM objects are reference counted: the image must belong to a GDCM owner (here an
    # unused writer, as in pydicom's GDCM RLE encoder), not to Python, or freeing it aborts
    writer = gdcm.ImageWriter()
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimension(0, cols)
    image.SetDimension(1, rows)
    signed = int(pixels.dtype == np.int16)
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, signed))
    image.SetPhotometricInterpretation(
        gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2)
    )
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetVR(gdcm.VR(gdcm.VR.OW))
    little = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    element.SetByteStringValue(little.tobytes())
    image.SetDataElement(element)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(image)
    if not change.Change():
        raise RuntimeError("GDCM could not encode the image as JPEG Lossless SV1")
    encoded = change.GetOutput()
    pixel_data = encoded.GetDataElement()
    fragments = pixel_data.GetSequenceOfFragments()
    if fragments is None or fragments.GetNumberOfFragments() != 1:
        raise RuntimeError("GDCM did not return one JPEG Lossless fragment")
    value = fragments.GetFragment(0).GetByteValue()
    # python-gdcm hands buffers over as str; pydicom's GDCM decoder reverses it the same way
    data = value.GetBuffer().encode("utf-8", "surrogateescape")
    if len(data) != int(str(value.GetLength())):
        raise RuntimeError("GDCM returned a JPEG Lossless fragment of the wrong length")
    return data


def _frame_encoder(uid: str) -> Callable[[Dataset, np.ndarray], bytes] | None:
    """A function returning one encoded frame for ``uid`` (None: native, not encapsulated)."""
    if uid == str(ExplicitVRLittleEndian):
        return None
    if uid == str(JPEGLosslessSV1):

        def jpeg(ds: Dataset, pixels: np.ndarray) -> bytes:
            return encode_jpeg_lossless(pixels, int(ds.BitsStored))

        return jpeg
    encoder = get_encoder(uid)
    if not encoder.is_available:
        raise ValueError(f"no encoder available for transfer syntax {uid}")
    plugin = "pylibjpeg" if "pylibjpeg" in encoder.available_plugins else ""

    def compress(ds: Dataset, pixels: np.ndarray) -> bytes:
        return encoder.encode(
            pixels,
            encoding_plugin=plugin,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            samples_per_pixel=1,
            photometric_interpretation="MONOCHROME2",
            bits_allocated=16,
            bits_stored=int(ds.BitsStored),
            pixel_representation=int(ds.PixelRepresentation),
            number_of_frames=1,
        )

    return compress


def _pixel_element(pixels: np.ndarray, frame: bytes | None) -> bytes:
    """Encoded (7FE0,0010) element: OW native, or OB encapsulated with undefined length."""
    head = struct.pack("<HH", 0x7FE0, 0x0010)
    if frame is None:
        data = pixels.tobytes()
        return head + b"OW\x00\x00" + struct.pack("<I", len(data)) + data
    items = encapsulate([frame])
    return head + b"OB\x00\x00\xff\xff\xff\xff" + items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def stored_pixels(hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU to stored values: int16 as is (signed) or ``HU + 1024`` as 12-bit uint16."""
    if signed:
        return np.ascontiguousarray(hu, dtype=np.int16)
    out = np.clip(hu, -1024, 3071).astype(np.int16)
    out += 1024
    return out.view(np.uint16)


def set_pixel_module(ds: Dataset, rows: int, cols: int, signed: bool) -> None:
    """Image Pixel + CT rescale attributes for the storage convention in use."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    if signed:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"


def write_slices(
    base: Dataset,
    hu: np.ndarray,
    affine: np.ndarray,
    instance_numbers: Iterable[int],
    sop_uid: Callable[[int], str],
    path_for: Callable[[int], Path],
    transfer_syntax: str,
    *,
    signed: bool,
    slice_location: bool = True,
    implementation: tuple[str, str] | None = None,
    group_length: bool = True,
) -> list[Path]:
    """Write one file per slice from a prepared header ``base`` (modified in place).

    Parameters
    ----------
    base
        Dataset with every attribute common to the series (no pixel data, no per-slice
        attributes).
    hu
        int16 ``[slice, row, column]`` in volume order; ``affine`` gives each position.
    instance_numbers
        InstanceNumber per volume slice.
    sop_uid, path_for
        SOPInstanceUID and output path for an instance number.
    transfer_syntax
        Writer name or UID (see :data:`TRANSFER_SYNTAXES`).
    signed
        Store signed 16-bit (RSNA) instead of unsigned 12-bit + intercept.
    slice_location
        Write SliceLocation (RSNA files have none).
    implementation
        (ImplementationClassUID, ImplementationVersionName) for the file meta; pydicom's
        when None.
    group_length
        Write (0002,0000) FileMetaInformationGroupLength (the RSNA files have none).
    """
    uid = resolve_transfer_syntax(transfer_syntax)
    encode_frame = _frame_encoder(uid)
    set_pixel_module(base, hu.shape[1], hu.shape[2], signed)
    written: list[Path] = []
    fast: _FastPath | None = None
    for k, inst in enumerate(instance_numbers):
        pos = affine[:3, 3] + affine[:3, 0] * k
        sop = sop_uid(int(inst))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop)
        meta.TransferSyntaxUID = UID(uid)
        if implementation is not None:
            meta.ImplementationClassUID = UID(implementation[0])
            meta.ImplementationVersionName = implementation[1]
        if not group_length:
            meta.FileMetaInformationVersion = b"\x00\x01"
            base.preamble = b"\x00" * 128
        base.file_meta = meta
        ipp = [_ds(float(v)) for v in pos]
        path = path_for(int(inst))
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = stored_pixels(hu[k], signed)
        frame = None if encode_frame is None else encode_frame(base, pixels)
        if fast is not None:
            dynamic = {
                _SOP: sop,
                _INSTANCE: str(int(inst)),
                _IPP: "\\".join(ipp),
                _LOCATION: ipp[2],
            }
            path.write_bytes(fast.encode(meta, dynamic, _pixel_element(pixels, frame)))
            written.append(path)
            continue
        base.SOPInstanceUID = sop
        base.InstanceNumber = int(inst)
        base.ImagePositionPatient = ipp
        if slice_location:
            base.SliceLocation = ipp[2]
        if frame is None:
            base.PixelData = pixels.tobytes()
            base["PixelData"].VR = "OW"
        else:
            base.PixelData = encapsulate([frame])
            base["PixelData"].VR = "OB"
            base["PixelData"].is_undefined_length = True
        pydicom.dcmwrite(path, base, enforce_file_format=group_length)
        written.append(path)
        if _FAST_PATH:
            # the first file went through pydicom (validated); the rest reuse its encoding
            fast = _FastPath(base, group_length)
    return written


_SOP, _INSTANCE, _IPP, _LOCATION = 0x00080018, 0x00200013, 0x00200032, 0x00201041
_PIXEL_DATA = 0x7FE00010
_FAST_PATH = True
"""Write the files after the first by reusing its encoded static elements.

The output is byte-identical to pydicom's (a test compares both paths); it only saves
pydicom's per-element overhead, which dominates writing a 300-slice series."""


class _FastPath:
    """Encode Explicit VR Little Endian files whose only changes are a few text elements
    and the pixel data."""

    def __init__(self, template: Dataset, group_length: bool) -> None:
        self.group_length = group_length
        self.preamble = bytes(getattr(template, "preamble", None) or b"\x00" * 128) + b"DICM"
        self.segments: list[bytes] = []
        self.dynamic: list[int] = []
        current = Dataset()
        for elem in template:
            tag = int(elem.tag)
            if tag in (_SOP, _INSTANCE, _IPP, _LOCATION, _PIXEL_DATA):
                self.segments.append(self._encode(current))
                self.dynamic.append(tag)
                current = Dataset()
            else:
                current.add(elem)
        self.segments.append(self._encode(current))
        if not self.dynamic or self.dynamic[-1] != _PIXEL_DATA:
            raise ValueError("the template must end with Pixel Data")

    @staticmethod
    def _encode(ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        return fp.getvalue()

    @staticmethod
    def _text(tag: int, vr: bytes, value: str) -> bytes:
        raw = value.encode("ascii")
        if len(raw) % 2:
            raw += b"\x00" if vr == b"UI" else b" "
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(raw)) + raw

    def encode(self, meta: FileMetaDataset, values: dict[int, str], pixel_element: bytes) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, meta, enforce_standard=self.group_length)
        parts = [self.preamble, fp.getvalue()]
        vrs = {_SOP: b"UI", _INSTANCE: b"IS", _IPP: b"DS", _LOCATION: b"DS"}
        for segment, tag in zip(self.segments, self.dynamic, strict=False):
            parts.append(segment)
            if tag == _PIXEL_DATA:
                parts.append(pixel_element)
            else:
                parts.append(self._text(tag, vrs[tag], values[tag]))
        parts.append(self.segments[-1])
        return b"".join(parts)


def _study_header(study: SyntheticStudy) -> Dataset:
    """Patient, General Study, equipment and acquisition attributes shared by all series."""
    seed = study.seed
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    hh, mm, ss = 8 + seed % 10, (seed * 7) % 60, (seed * 13) % 60
    ds.StudyTime = f"{hh:02d}{mm:02d}{ss:02d}"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"{hh:02d}{(mm + 1) % 60:02d}{ss:02d}"
    ds.AccessionNumber = f"SYNA{seed:08d}"[:16]
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Synthetic Phantom Institute"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTHCT01"
    ds.StudyDescription = "CT CERVICAL SPINE WO CONTRAST"
    ds.ManufacturerModelName = MODEL
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = f"19{40 + seed % 50:02d}0101"
    ds.PatientSex = "MFO"[seed % 3]
    ds.PatientAge = f"{2024 - (1940 + seed % 50):03d}Y"
    ds.BodyPartExamined = "CSPINE"
    ds.KVP = "120"
    ds.SoftwareVersions = "cspine-node synthetic 1"
    ds.GantryDetectorTilt = "0"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 200
    ds.PatientPosition = study.patient_position
    ds.StudyInstanceUID = study.study_uid
    ds.StudyID = f"{seed % 100000}"
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.LossyImageCompression = "00"
    return ds


def write_series(
    study: SyntheticStudy,
    out_dir: str | Path,
    transfer_syntax: str = "explicit",
    *,
    series: str | ExtraSeries | None = None,
    file_prefix: str = "IM",
) -> list[Path]:
    """Write the bone-kernel series (or one extra series) of ``study`` with complete headers.

    Parameters
    ----------
    study
        From :func:`ai.synthetic.generate_study`.
    out_dir
        Folder for the files (created); files are ``<prefix><InstanceNumber:05d>.dcm``.
    transfer_syntax
        ``"explicit"`` (Explicit VR Little Endian), ``"jpeg-lossless"`` (JPEG Lossless SV1),
        ``"j2k-lossless"`` (JPEG 2000 lossless), ``"rle"`` (RLE Lossless), or the UID.
    series
        ``None`` for the bone series; an :class:`ExtraSeries` of the study or its name
        (``"scout"``, ``"soft_tissue"``) for an extra series.

    Returns
    -------
    list[pathlib.Path]
        Written files in volume order.
    """
    out = Path(out_dir)
    base = _study_header(study)
    if series is None:
        hu, affine = study.volume.hu, study.volume.affine
        instance_numbers = [int(i) for i in study.instance_numbers]
        series_uid, number = study.series_uid, 2
        base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        base.SeriesDescription = f"C-SPINE BONE {study.slice_thickness:g}"
        base.ConvolutionKernel = study.kernel
        base.SliceThickness = _ds(study.slice_thickness)
        base.WindowCenter, base.WindowWidth = "500", "2000"
    else:
        extra = series if isinstance(series, ExtraSeries) else _find_extra(study, series)
        hu, affine = extra.hu, extra.affine
        instance_numbers = list(range(1, hu.shape[0] + 1))
        series_uid, number = extra.series_uid, extra.series_number
        base.ImageType = list(extra.image_type)
        base.SeriesDescription = extra.description
        base.ConvolutionKernel = extra.kernel
        base.SliceThickness = _ds(extra.slice_thickness)
        if extra.name == "scout":
            base.WindowCenter, base.WindowWidth = "500", "3000"
        else:
            base.WindowCenter, base.WindowWidth = "40", "400"
    row_dir, col_dir, dy, dx = orientation_of(affine)
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = number
    base.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    base.PixelSpacing = [_ds(dy), _ds(dx)]
    base.ReconstructionDiameter = _ds(max(dx * hu.shape[2], dy * hu.shape[1]))

    def sop_uid(inst: int) -> str:
        return sop_uid_for(study.seed, series_uid, inst)

    paths = write_slices(
        base,
        hu,
        affine,
        instance_numbers,
        sop_uid,
        lambda inst: out / f"{file_prefix}{inst:05d}.dcm",
        transfer_syntax,
        signed=False,
        slice_location=(series is None or base.ImageType[2] == "AXIAL"),
    )
    logger.debug("wrote series files=%d transfer_syntax=%s", len(paths), transfer_syntax)
    return paths


def _find_extra(study: SyntheticStudy, name: str) -> ExtraSeries:
    for extra in study.extra_series:
        if extra.name == name:
            return extra
    raise ValueError(
        f"study has no extra series {name!r}; generate it with StudySpec(extra_series=True)"
    )


def write_study(
    study: SyntheticStudy, out_dir: str | Path, transfer_syntax: str = "explicit"
) -> list[Path]:
    """Write every series of ``study`` into ``out_dir/<SeriesNumber>_<name>/``.

    Returns
    -------
    list[pathlib.Path]
        All written files (bone series first).
    """
    out = Path(out_dir)
    paths = write_series(study, out / "2_bone", transfer_syntax)
    for extra in study.extra_series:
        paths += write_series(
            study, out / f"{extra.series_number}_{extra.name}", transfer_syntax, series=extra
        )
    return paths
