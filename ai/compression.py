"""Which instances hold lossy-compressed pixels: one rule for the receiver and the loader.

:mod:`dicom_node.validate` records it per instance as it stores one; :mod:`ai.volume`
reports a series with such slices (HU values are then approximate).
"""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    MPEGTransferSyntaxes,
)

LOSSY_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLSNearLossless,
        JPEG2000,  # may be lossy
        HTJ2K,  # may be lossy
        # JPEG XL JPEG Recompression and JPEG XL, which pydicom 3.0 does not name yet
        UID("1.2.840.10008.1.2.4.111"),
        UID("1.2.840.10008.1.2.4.112"),
        *MPEGTransferSyntaxes,
    }
)
"""Transfer syntaxes whose pixel data is, or may be, lossy-compressed (PS3.5 Annex A)."""


def is_lossy(transfer_syntax: object, lossy_image_compression: object = None) -> bool:
    """Whether an instance's pixels were lossy-compressed, now or at some time before.

    Parameters
    ----------
    transfer_syntax
        The instance's Transfer Syntax UID (``None`` or empty when unknown).
    lossy_image_compression
        Its Lossy Image Compression (0028,2110) value; ``"01"`` means the pixels were
        lossy-compressed at some time, whatever the transfer syntax now.

    Returns
    -------
    bool
        True for a lossy transfer syntax or Lossy Image Compression ``"01"``.
    """
    return str(transfer_syntax or "") in LOSSY_TRANSFER_SYNTAXES or (
        str(lossy_image_compression or "") == "01"
    )


__all__ = ["LOSSY_TRANSFER_SYNTAXES", "is_lossy"]
