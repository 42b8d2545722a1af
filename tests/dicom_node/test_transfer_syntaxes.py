"""One rule for lossy compression: the receiver's header and the volume loader agree."""

from __future__ import annotations

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import HTJ2K, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1

from ai import volume
from ai.compression import LOSSY_TRANSFER_SYNTAXES, is_lossy
from dicom_node.validate import ACCEPTED_LOSSY_TRANSFER_SYNTAXES, LOSSLESS_TRANSFER_SYNTAXES


def test_accepted_syntaxes_are_classified_by_the_one_lossy_rule() -> None:
    assert set(ACCEPTED_LOSSY_TRANSFER_SYNTAXES) <= LOSSY_TRANSFER_SYNTAXES
    assert not set(LOSSLESS_TRANSFER_SYNTAXES) & LOSSY_TRANSFER_SYNTAXES


def test_is_lossy_reads_the_syntax_or_lossy_image_compression() -> None:
    assert is_lossy(JPEGBaseline8Bit) and is_lossy(HTJ2K)
    assert not is_lossy(JPEGLosslessSV1) and not is_lossy(None)
    assert is_lossy(ExplicitVRLittleEndian, "01")
    assert not is_lossy(ExplicitVRLittleEndian, "00")


def test_volume_loader_uses_the_same_rule() -> None:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert not volume._is_lossy(ds)
    ds.LossyImageCompression = "01"
    assert volume._is_lossy(ds)
    del ds.LossyImageCompression
    ds.file_meta.TransferSyntaxUID = HTJ2K
    assert volume._is_lossy(ds)
