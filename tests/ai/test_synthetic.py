"""Synthetic neck-CT generator and its DICOM writer: truth, determinism, validity, encodings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ai.synthetic import (
    TRANSFER_SYNTAXES,
    StudySpec,
    generate_study,
    write_series,
    write_study,
)
from ai.types import VERTEBRAE
from ai.volume import load_series

SMALL = StudySpec.small(fracture_rate=1.0)


@pytest.fixture(scope="module")
def studies():
    """A few small fractured studies covering the fields of view and orientations."""
    return [generate_study(seed, SMALL) for seed in range(6)]


def _z_of_slices(study) -> np.ndarray:
    aff = study.volume.affine
    return aff[2, 3] + aff[2, 0] * np.arange(study.volume.hu.shape[0])


def test_labels_are_bone_and_bone_is_labelled(studies):
    for study in studies:
        hu, lab = study.volume.hu, study.labels
        assert hu.dtype == np.int16 and lab.dtype == np.uint8 and hu.shape == lab.shape
        cervical = (lab >= 1) & (lab <= 7)
        assert cervical.sum() > 500
        assert (hu[cervical] >= 100).mean() >= 0.99, "labelled voxels must be bone by HU"
        assert np.median(hu[cervical]) >= 250
        dense = hu > 700
        assert (lab[dense] > 0).mean() >= 0.98, "dense bone must carry a label"
        # soft tissue, fat and air are never labelled
        assert (hu[lab == 0] < 700).mean() > 0.999


def test_vertebrae_stack_from_head_to_feet(studies):
    for study in studies:
        z = _z_of_slices(study)
        centres = []
        for code, name in enumerate(VERTEBRAE, start=1):
            mask = study.labels == code
            if study.coverage[name] >= 0.95:
                assert mask.any(), f"{name} is in the field of view but unlabelled"
            if mask.any():
                centres.append(float(z[np.nonzero(mask)[0]].mean()))
        assert len(centres) >= 4
        assert np.all(np.diff(centres) < 0), f"C1..C7 must descend in z, got {centres}"
        assert set(study.visible) == set(VERTEBRAE)


def test_study_level_truth_is_consistent(studies):
    for study in studies:
        assert study.patient_overall == int(any(study.vertebra_fractured.values()))
        fractured = {f.vertebra for f in study.fractures}
        assert {v for v, x in study.vertebra_fractured.items() if x} == fractured
        for name in fractured:
            assert study.visible[name]
    assert sum(s.patient_overall for s in studies) == len(studies)  # fracture_rate=1.0
    none = generate_study(0, StudySpec.small(fracture_rate=0.0))
    assert none.patient_overall == 0 and not none.fractures


def test_boxes_lie_on_the_fractured_vertebra(studies):
    n_boxes = 0
    for study in studies:
        for fr in study.fractures:
            code = VERTEBRAE.index(fr.vertebra) + 1
            assert fr.boxes, f"{fr.kind} of {fr.vertebra} has no box"
            for x, y, w, h, slice_number in fr.boxes:
                k = int(np.nonzero(study.instance_numbers == slice_number)[0][0])
                region = study.labels[k, y : y + h, x : x + w]
                assert (region == code).sum() >= 2, "box does not touch its vertebra"
                n_boxes += 1
    assert n_boxes > 10


def test_fractures_are_visible_in_the_image():
    """Same seed with and without fractures: the difference is inside the boxes."""
    kinds_seen = set()
    for seed in range(10):
        intact = generate_study(seed, StudySpec.small(fracture_rate=0.0, noise_hu=0.0))
        broken = generate_study(seed, StudySpec.small(fracture_rate=1.0, noise_hu=0.0))
        assert broken.fractures
        changed = np.abs(broken.volume.hu.astype(np.int32) - intact.volume.hu) > 300
        in_boxes = np.zeros_like(changed)
        for fr in broken.fractures:
            kinds_seen.add(fr.kind)
            for x, y, w, h, n in fr.boxes:
                k = int(np.nonzero(broken.instance_numbers == n)[0][0])
                in_boxes[k, y : y + h, x : x + w] = True
        assert changed[in_boxes].sum() >= 4, "a fracture must change the image in its boxes"
        # elsewhere only neighbouring discs may differ (compression opens the disc space)
        assert changed[~in_boxes].sum() <= changed[in_boxes].sum() * 3
    assert {"body_break", "arch_break"} <= kinds_seen


def test_compression_loses_body_height():
    spec = StudySpec.small(
        rows=128,
        cols=128,
        n_slices=160,
        fracture_rate=1.0,
        fracture_kinds=("compression",),
        field_of_view="full",
    )
    for seed in range(20):
        broken = generate_study(seed, spec)
        if broken.fractures:
            break
    fr = broken.fractures[0]
    assert fr.kind == "compression" and 0.2 <= fr.height_loss <= 0.5
    intact = generate_study(seed, StudySpec.small(**{**spec.__dict__, "fracture_rate": 0.0}))
    code = VERTEBRAE.index(fr.vertebra) + 1
    before, after = intact.labels == code, broken.labels == code
    # anterior part of the vertebra (rows run anterior -> posterior): the body's front
    front = np.arange(before.shape[1])[None, :, None] < np.percentile(np.nonzero(before)[1], 20)
    assert (after & front).sum() < 0.88 * (before & front).sum()
    assert after.sum() < before.sum()


def test_same_seed_gives_byte_identical_files(tmp_path):
    spec = StudySpec.small(rows=64, cols=64, n_slices=40, extra_series=True)
    a = write_study(generate_study(42, spec), tmp_path / "a", "jpeg-lossless")
    b = write_study(generate_study(42, spec), tmp_path / "b", "jpeg-lossless")
    assert len(a) == len(b) > 40
    for pa, pb in zip(a, b, strict=True):
        assert pa.relative_to(tmp_path / "a") == pb.relative_to(tmp_path / "b")
        assert pa.read_bytes() == pb.read_bytes()
    c = generate_study(43, spec)
    assert not np.array_equal(c.volume.hu[:10], generate_study(42, spec).volume.hu[:10])


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error") or " Error " in line]


def test_dciodvfy_reports_no_errors(tmp_path):
    study = generate_study(3, StudySpec.small(extra_series=True, fracture_rate=1.0))
    checked = 0
    for ts in ("explicit", "jpeg-lossless"):
        paths = write_study(study, tmp_path / ts, ts)
        by_series: dict[Path, list[Path]] = {}
        for p in paths:
            by_series.setdefault(p.parent, []).append(p)
        assert len(by_series) == 3  # scout, bone, soft tissue
        for files in by_series.values():
            for p in (files[0], files[-1]):
                assert _dciodvfy_errors(p) == [], p
                checked += 1
    assert checked == 12
    # the check itself can fail: a CT without its Modality is reported
    broken = pydicom.dcmread(paths[0])
    del broken.Modality
    broken.save_as(tmp_path / "broken.dcm")
    assert _dciodvfy_errors(tmp_path / "broken.dcm")


def test_headers_are_consistent(tmp_path):
    study = generate_study(5, StudySpec.small(extra_series=True))
    paths = write_study(study, tmp_path, "explicit")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    for attr in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "FrameOfReferenceUID",
        "StudyDate",
    ):
        assert len({str(h.get(attr)) for h in headers}) == 1, attr
    assert len({h.SeriesInstanceUID for h in headers}) == 3
    assert len({h.SOPInstanceUID for h in headers}) == len(headers)
    kernels = {h.SeriesDescription: (h.ConvolutionKernel, tuple(h.ImageType)) for h in headers}
    assert any(t[2] == "LOCALIZER" for _, t in kernels.values())
    assert sum(1 for k, _ in kernels.values() if k == "STANDARD") == 2
    bone = [h for h in headers if h.ImageType[2] == "AXIAL" and h.SeriesNumber == 2]
    soft = [h for h in headers if h.ImageType[2] == "AXIAL" and h.SeriesNumber == 3]
    assert float(soft[0].SliceThickness) > float(bone[0].SliceThickness)
    assert headers[0].PatientName == "SYNTH^PHANTOM^0005" and headers[0].PatientID == "SYN0005"


@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAXES))
def test_transfer_syntaxes_decode_to_the_same_hu(tmp_path, name):
    study = generate_study(7, StudySpec.small(rows=80, cols=80, n_slices=24))
    paths = write_series(study, tmp_path, name)
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in paths} == {
        TRANSFER_SYNTAXES[name]
    }
    vol = load_series(paths, allow_issues=False)
    assert np.array_equal(vol.hu, study.volume.hu)
    assert np.allclose(vol.affine, study.volume.affine, atol=1e-3)
    if name == "jpeg-lossless":  # second, independent decoder
        ds = pydicom.dcmread(paths[5])
        ref = pydicom.pixels.pixel_array(ds, decoding_plugin="gdcm").astype(np.int32) - 1024
        k = int(np.nonzero(study.instance_numbers == ds.InstanceNumber)[0][0])
        assert np.array_equal(ref, study.volume.hu[k])


def test_orientation_variants_round_trip(tmp_path):
    for pos in ("HFS", "FFS"):
        for order in ("superior_first", "inferior_first"):
            spec = StudySpec.small(
                rows=48, cols=48, n_slices=30, patient_position=pos, instance_order=order
            )
            study = generate_study(1, spec)
            first = study.instance_numbers[0]
            top_is_first = _z_of_slices(study).argmax() == int(np.argmin(study.instance_numbers))
            assert top_is_first == (order == "superior_first"), (pos, order, first)
            paths = write_series(study, tmp_path / f"{pos}-{order}")
            vol = load_series(paths)
            assert np.array_equal(vol.hu, study.volume.hu)
            iop = [float(v) for v in pydicom.dcmread(paths[0]).ImageOrientationPatient]
            assert iop[0] == (1.0 if pos == "HFS" else -1.0)


def test_spec_validation_states_the_constraint():
    with pytest.raises(ValueError, match="fracture_rate"):
        StudySpec(fracture_rate=1.5)
    with pytest.raises(ValueError, match="rows and cols"):
        StudySpec(rows=4)
    with pytest.raises(ValueError, match="transfer syntax"):
        write_series(
            generate_study(0, StudySpec.small(rows=32, cols=32, n_slices=10)),
            "/nonexistent",
            "jpeg-2000",
        )


@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAXES))
def test_fast_path_matches_pydicom_byte_for_byte(tmp_path, monkeypatch, name):
    import ai.synthetic.dicom_writer as dw
    from ai.synthetic import write_rsna_dataset

    study = generate_study(9, StudySpec.small(rows=40, cols=40, n_slices=12))
    fast = write_series(study, tmp_path / "fast", name)
    write_rsna_dataset(tmp_path / "rsna_fast", [study], transfer_syntax=name)
    monkeypatch.setattr(dw, "_FAST_PATH", False)
    slow = write_series(study, tmp_path / "slow", name)
    write_rsna_dataset(tmp_path / "rsna_slow", [study], transfer_syntax=name)
    assert [p.read_bytes() for p in fast] == [p.read_bytes() for p in slow]
    rf = sorted((tmp_path / "rsna_fast").rglob("*.dcm"))
    rs = sorted((tmp_path / "rsna_slow").rglob("*.dcm"))
    assert len(rf) == 12 and [p.read_bytes() for p in rf] == [p.read_bytes() for p in rs]


def test_studies_vary_within_the_documented_ranges():
    seen_fov, seen_pos, seen_order, dz, dx = set(), set(), set(), [], []
    for seed in range(40):
        spec = StudySpec(
            rows=24,
            cols=24,
            n_slices=None,
            noise_hu=0.0,
            blur=False,
            fov_mm=(128.0, 358.0),
            slice_spacing=(3.0, 4.0),
        )
        study = generate_study(seed, spec)
        seen_fov.add(study.field_of_view)
        seen_pos.add(study.patient_position)
        first_top = study.instance_numbers[int(np.argmax(_z_of_slices(study)))] == 1
        seen_order.add(first_top)
        sk, sj, si = study.volume.spacing
        dz.append(sk)
        dx.append(si)
        assert sj == si
        if study.field_of_view == "no_skull":
            assert not (study.labels == 20).any(), "skull base must be cut off"
        if study.field_of_view == "c1_c5":
            assert not study.visible["C7"] and study.visible["C1"]
    assert seen_fov == {"full", "no_skull", "c1_c5"}
    assert seen_pos == {"HFS", "FFS"} and seen_order == {True, False}
    assert min(dz) >= 3.0 and max(dz) <= 4.0 and max(dz) - min(dz) > 0.3
    assert min(dx) >= 128 / 24 * 0.999 and max(dx) <= 358 / 24 * 1.001


def test_default_study_is_512_with_realistic_spacing():
    study = generate_study(2, StudySpec(n_slices=48, fracture_rate=1.0))
    assert study.shape == (48, 512, 512)
    sk, _, si = study.volume.spacing
    assert 0.25 <= si <= 0.7 and 0.5 <= sk <= 1.25
    assert 0.5 <= study.slice_thickness <= 1.25
    cervical = (study.labels >= 1) & (study.labels <= 7)
    assert (study.volume.hu[cervical] >= 100).mean() >= 0.99


@pytest.mark.parametrize(
    ("precision", "dtype"), [(16, np.int16), (12, np.uint16), (16, np.uint16), (10, np.uint16)]
)
def test_jpeg_lossless_encoder_round_trips_with_two_decoders(precision, dtype):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    from ai.synthetic.dicom_writer import encode_jpeg_lossless

    rng = np.random.default_rng(precision)
    if dtype is np.int16:
        image = rng.normal(0, 400, (61, 47)).astype(np.int16)
        image[0, :5] = [-32768, 32767, -1, 0, 1]  # extreme differences (category 16)
    else:
        image = rng.integers(0, 1 << precision, (61, 47)).astype(np.uint16)
        image[:3] = (1 << precision) - 1  # runs of 0xFF bytes exercise byte stuffing
    ds = Dataset()
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, precision, precision - 1
    ds.PixelRepresentation = int(dtype is np.int16)
    frame = encode_jpeg_lossless(image, precision)
    assert frame[:2] == b"\xff\xd8" and frame.rstrip(b"\x00").endswith(b"\xff\xd9")
    sof = frame.index(b"\xff\xc3")  # SOF3: lossless, Huffman (process 14)
    assert precision <= frame[sof + 4] <= 16  # GDCM writes P=16 for BitsStored 10 and 12
    sos = frame.index(b"\xff\xda")
    assert frame[sos + 4] == 1 and frame[sos + 7] == 1  # one component, predictor 1 (SV1)
    ds.PixelData = encapsulate([frame])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    for plugin in ("pylibjpeg", "gdcm"):
        decoded = pydicom.pixels.pixel_array(ds, decoding_plugin=plugin)
        assert np.array_equal(decoded.astype(np.int64), image.astype(np.int64)), plugin


@pytest.mark.parametrize("first", ["ai.synthetic", "dicom_node.writers"])
def test_png_writing_survives_pydicom_and_gdcm_in_the_process(tmp_path, first):
    """``import pydicom`` loads python-gdcm with RTLD_GLOBAL; its bundled zlib must not
    take over Pillow's PNG compression (the packages load Pillow first)."""
    import subprocess
    import sys

    code = (
        f"import {first}\n"
        "import sys; from pathlib import Path\n"
        "from ai.synthetic import StudySpec, generate_study, write_series\n"
        "from ai.synthetic.preview import render_previews\n"
        "study = generate_study(3, StudySpec.small(rows=48, cols=48, n_slices=12))\n"
        "out = Path(sys.argv[1])\n"
        "write_series(study, out / 'dcm', transfer_syntax='jpeg-lossless')\n"
        "assert 'gdcm' in sys.modules\n"
        "render_previews(study, out / 'png')\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    assert len(list((tmp_path / "png").glob("*.png"))) == 3


def test_volume_lists_the_sop_instance_uids_written(tmp_path):
    study = generate_study(4, StudySpec.small(rows=32, cols=32, n_slices=16))
    paths = write_series(study, tmp_path)
    vol = load_series(paths)
    assert vol.source_sop_instance_uids == study.volume.source_sop_instance_uids
    assert len(set(vol.source_sop_instance_uids)) == 16
