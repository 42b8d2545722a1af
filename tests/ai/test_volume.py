"""Tests of ai.volume.load_series on crafted series, real tools and real files."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from ai import volume as vm
from ai.errors import VolumeError


def _ct_slice(
    pos: tuple[float, float, float],
    pixels: np.ndarray,
    *,
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.8, 0.7),
    stripped: bool = False,
    series_uid: str = "1.2.3.4",
    intercept: float = -1024.0,
    slope: float = 1.0,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if not stripped:
        ds.SOPClassUID = CTImageStorage
        ds.Modality = "CT"
        ds.FrameOfReferenceUID = "1.2.3.9"
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.PixelSpacing = [str(spacing[0]), str(spacing[1])]
    ds.SliceThickness = "1.0"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(intercept)
    ds.RescaleSlope = str(slope)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def _write(folder: Path, datasets: list[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = folder / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _stack(n: int = 6, rows: int = 12, cols: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2000, size=(n, rows, cols)).astype(np.int16)


def _series(tmp: Path, stored: np.ndarray, zs: list[float] | None = None, **kw) -> list[Path]:
    zs = zs if zs is not None else [10.0 + 1.25 * k for k in range(stored.shape[0])]
    return _write(tmp, [_ct_slice((-50.0, -60.0, z), stored[k], **kw) for k, z in enumerate(zs)])


def test_sorted_by_position_rescaled_and_affine(tmp_path: Path) -> None:
    stored = _stack()
    zs = [10.0 + 1.25 * k for k in range(6)]
    order = [3, 0, 5, 1, 4, 2]  # files written in a scrambled order
    paths = _write(tmp_path, [_ct_slice((-50.0, -60.0, zs[k]), stored[k]) for k in order])
    vol = vm.load_series(paths)
    assert vol.hu.dtype == np.int16
    np.testing.assert_array_equal(vol.hu, stored.astype(np.int32) - 1024)
    assert vol.issues == []
    expected = np.array(
        [[0, 0, 0.7, -50], [0, 0.8, 0, -60], [1.25, 0, 0, 10], [0, 0, 0, 1]], dtype=float
    )
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    assert vol.spacing == pytest.approx((1.25, 0.8, 0.7))


def test_file_order_invariance_and_stripped_headers(tmp_path: Path) -> None:
    stored = _stack(n=8)
    paths = _series(tmp_path, stored, stripped=True)
    reference = vm.load_series(paths)
    for seed in range(3):
        shuffled = list(paths)
        random.Random(seed).shuffle(shuffled)
        again = vm.load_series(shuffled)
        np.testing.assert_array_equal(again.hu, reference.hu)
        np.testing.assert_array_equal(again.affine, reference.affine)
        assert again.source_sop_instance_uids == reference.source_sop_instance_uids


def test_descending_input_and_flipped_orientation(tmp_path: Path) -> None:
    stored = _stack(n=5)
    # Normal = row x col = (1,0,0) x (0,-1,0) = (0,0,-1): ascending along the normal
    # means z decreasing.
    zs = [20.0 - 2.0 * k for k in range(5)]
    paths = _series(tmp_path, stored, zs=zs[::-1], iop=(1, 0, 0, 0, -1, 0))
    vol = vm.load_series(paths)
    np.testing.assert_array_equal(vol.hu, stored[::-1].astype(np.int32) - 1024)
    assert vol.affine[2, 0] == pytest.approx(-2.0)
    assert vol.affine[1, 1] == pytest.approx(-0.8)


@pytest.mark.parametrize(
    ("tool", "args", "syntax"),
    [
        ("dcmcrle", [], RLELossless),
        ("dcmcjpls", [], JPEGLSLossless),
        ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70"),
        ("dcmconv", ["+ti"], ImplicitVRLittleEndian),
        ("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99"),
    ],
)
def test_transfer_syntax_invariance_with_dcmtk(
    tmp_path: Path, tool: str, args: list[str], syntax: str
) -> None:
    stored = _stack(n=4, rows=16, cols=16)
    paths = _series(tmp_path / "plain", stored)
    reference = vm.load_series(paths)
    out = tmp_path / "enc"
    out.mkdir()
    converted = []
    for p in paths:
        target = out / p.name
        subprocess.run([shutil.which(tool) or tool, *args, str(p), str(target)], check=True)
        converted.append(target)
    import pydicom

    assert pydicom.dcmread(converted[0]).file_meta.TransferSyntaxUID == syntax
    vol = vm.load_series(converted)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_array_equal(vol.affine, reference.affine)
    assert not vol.lossy


def test_pydicom_j2k_lossless_matches(tmp_path: Path) -> None:
    stored = _stack(n=3, rows=64, cols=64)
    datasets = [_ct_slice((0.0, 0.0, float(k)), stored[k]) for k in range(3)]
    reference = vm.load_series(_write(tmp_path / "a", datasets))
    for ds in datasets:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    vol = vm.load_series(_write(tmp_path / "b", datasets))
    np.testing.assert_array_equal(vol.hu, reference.hu)


def test_lossy_jpeg_is_flagged(tmp_path: Path) -> None:
    stored = (_stack(n=3, rows=16, cols=16) // 16).astype(np.int16)  # 8-bit range
    paths = _series(tmp_path / "plain", stored)
    out = tmp_path / "lossy"
    out.mkdir()
    lossy = []
    for p in paths:
        subprocess.run(["dcmcjpeg", "+eb", str(p), str(out / p.name)], check=True)
        lossy.append(out / p.name)
    vol = vm.load_series(lossy)
    assert vol.lossy
    assert "lossy_compression" in [i.code for i in vol.issues]
    with pytest.raises(vm.LossyCompressionError):
        vm.load_series(lossy, allow_issues=False)


def test_duplicate_positions_are_deduplicated(tmp_path: Path) -> None:
    stored = _stack(n=5)
    zs = [0.0, 1.0, 2.0, 2.0, 3.0]
    paths = _series(tmp_path, stored, zs=zs)
    vol = vm.load_series(paths)
    assert vol.hu.shape[0] == 4
    assert [i.code for i in vol.issues] == ["duplicate_positions"]
    assert vol.spacing[0] == pytest.approx(1.0)
    with pytest.raises(vm.DuplicatePositionsError, match="repeat a position"):
        vm.load_series(paths, allow_issues=False)


def test_gap_and_uneven_spacing(tmp_path: Path) -> None:
    stored = _stack(n=6)
    gap = _series(tmp_path / "gap", stored, zs=[0.0, 1.0, 2.0, 5.0, 6.0, 7.0])
    vol = vm.load_series(gap)
    assert [i.code for i in vol.issues] == ["gap"]
    assert vol.spacing[0] == pytest.approx(1.0)
    with pytest.raises(vm.SliceGapError, match="missing slices"):
        vm.load_series(gap, allow_issues=False)
    uneven = _series(tmp_path / "uneven", stored, zs=[0.0, 1.0, 2.2, 3.2, 4.3, 5.3])
    assert [i.code for i in vm.load_series(uneven).issues] == ["uneven_spacing"]
    with pytest.raises(vm.UnevenSpacingError):
        vm.load_series(uneven, allow_issues=False)


def test_gantry_tilt_gives_sheared_affine(tmp_path: Path) -> None:
    stored = _stack(n=5)
    angle = np.deg2rad(15.0)
    iop = (1, 0, 0, 0, float(np.cos(angle)), float(-np.sin(angle)))
    # Tilted image planes stacked straight along z: the typical gantry-tilt series.
    datasets = [_ct_slice((0.0, 0.0, 2.0 * k), stored[k], iop=iop) for k in range(5)]
    paths = _write(tmp_path, datasets)
    vol = vm.load_series(paths)
    assert [i.code for i in vol.issues] == ["gantry_tilt"]
    # The affine maps every slice origin exactly onto its ImagePositionPatient.
    for k in range(5):
        np.testing.assert_allclose(vol.affine @ [k, 0, 0, 1], [0, 0, 2.0 * k, 1], atol=1e-4)
    with pytest.raises(vm.GantryTiltError, match="gantry tilt"):
        vm.load_series(paths, allow_issues=False)


def test_non_axial_mixed_orientation_and_dimensions(tmp_path: Path) -> None:
    stored = _stack(n=3)
    coronal = [
        _ct_slice((0.0, float(k), 0.0), stored[k], iop=(1, 0, 0, 0, 0, -1)) for k in range(3)
    ]
    paths = _write(tmp_path / "cor", coronal)
    assert [i.code for i in vm.load_series(paths).issues] == ["non_axial"]
    with pytest.raises(vm.NonAxialError, match="coronal"):
        vm.load_series(paths, allow_issues=False)

    mixed = [_ct_slice((0.0, 0.0, float(k)), stored[k]) for k in range(3)]
    mixed[1] = _ct_slice((0.0, 0.0, 1.0), stored[1], iop=(0, 1, 0, 0, 0, -1))
    with pytest.raises(vm.MixedOrientationError):
        vm.load_series(_write(tmp_path / "mixo", mixed))

    small = _stack(n=1, rows=8, cols=8)[0]
    dims = [_ct_slice((0.0, 0.0, float(k)), stored[k]) for k in range(3)]
    dims.append(_ct_slice((0.0, 0.0, 3.0), small))
    dim_paths = _write(tmp_path / "dims", dims)
    vol = vm.load_series(dim_paths)
    assert vol.hu.shape == (3, 12, 10)
    assert [i.code for i in vol.issues] == ["mixed_dimensions"]
    with pytest.raises(vm.MixedDimensionsError):
        vm.load_series(dim_paths, allow_issues=False)


def test_refusals(tmp_path: Path) -> None:
    stored = _stack(n=2)
    ds = _ct_slice((0.0, 0.0, 0.0), stored[0])
    del ds.ImagePositionPatient
    with pytest.raises(vm.MissingGeometryError, match="ImagePositionPatient"):
        vm.load_series(_write(tmp_path / "nogeo", [ds]))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(vm.SeriesReadError):
        vm.load_series([junk])
    with pytest.raises(VolumeError):
        vm.load_series([])


# --- real files ---------------------------------------------------------------


def test_real_ge_gantry_tilt_series(real_data: Path) -> None:
    files = sorted((real_data / "neurolabusc_dcm_qa_ct/GE_HiSpeed_head_gantry_tilt").glob("*"))
    shuffled = list(files)
    random.Random(1).shuffle(shuffled)
    vol = vm.load_series(shuffled)
    assert vol.hu.shape == (28, 512, 512)
    codes = {i.code for i in vol.issues}
    assert {"gantry_tilt", "gap"} <= codes
    with pytest.raises(vm.GantryTiltError):
        vm.load_series(files, allow_issues=False)
    # Head CT: air around the head, bone inside.
    assert vol.hu.min() <= -1000 and vol.hu.max() > 1000


def test_real_totalsegmentator_j2k_series(real_data: Path) -> None:
    files = sorted((real_data / "wasserth_TotalSegmentator/example_ct_dicom").glob("*"))
    vol = vm.load_series(files[::-1])
    assert vol.hu.shape == (20, 512, 512)
    assert vol.issues == []
    assert vol.spacing == pytest.approx((2.0, 0.9765625, 0.9765625), rel=1e-4)
    assert vol.affine[2, 0] > 0  # axial slices ascend towards the head
    assert vol.hu.min() > -1100 and vol.hu.max() < 3100


def test_real_enhanced_ct_and_stripped_rsna(real_data: Path) -> None:
    ect = vm.load_series([real_data / "pydicom-data/eCT_Supplemental.dcm"])
    assert ect.hu.shape == (2, 512, 512)
    assert ect.spacing[0] == pytest.approx(10.0)
    rsna = vm.load_series([real_data / "john-james-ai_rsna2022_slice/test1.dcm"])
    assert rsna.hu.shape == (1, 512, 512)


def test_real_transfer_syntaxes_decode_identically(real_data: Path) -> None:
    folder = real_data / "cornerstonejs_cornerstone3D"
    reference = vm.load_series([folder / "CTImage.dcm"]).hu
    for name in (
        "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm",
        "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm",
        "CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm",
        "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm",
        "CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm",
        "CTImage.dcm_DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99.dcm",
    ):
        vol = vm.load_series([folder / name])
        np.testing.assert_array_equal(vol.hu, reference, err_msg=name)
        assert not vol.lossy, name
    lossy = vm.load_series(
        [folder / "CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm"]
    )
    assert lossy.lossy
    assert np.abs(lossy.hu.astype(int) - reference).mean() < 64  # rescale applied
    with pytest.raises(vm.SeriesReadError, match="cannot be decoded"):
        vm.load_series(
            [folder / "CTImage.dcm_JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53.dcm"]
        )


def test_real_refusals(real_data: Path) -> None:
    with pytest.raises(vm.NonAxialError, match="coronal"):
        vm.load_series(
            [real_data / "pylibjpeg-data/TOSHIBA_J2K_SIZ0_PixRep1.dcm"], allow_issues=False
        )
    with pytest.raises(vm.NotCTError):
        vm.load_series([real_data / "pydicom_test_files/MR_truncated.dcm"])
    with pytest.raises(VolumeError, match="no usable CT"):
        vm.load_series([real_data / "fo-dicom/GH342.dcm"])  # a localizer only
    with pytest.raises(vm.MissingGeometryError):
        vm.load_series([real_data / "fo-dicom/GH178.dcm"])  # header without geometry or pixels
