"""RSNA 2022 layout: synthetic writer, header quirks and the ai.rsna reader round trip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from ai.rsna import RSNADataset, align_segmentation
from ai.synthetic import StudySpec, generate_study, write_rsna_dataset
from ai.types import VERTEBRAE, CTVolume

VARIANTS = [
    ("HFS", "superior_first"),
    ("FFS", "superior_first"),
    ("HFS", "inferior_first"),
    ("FFS", "inferior_first"),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    studies = [
        generate_study(
            seed,
            StudySpec.small(
                rows=64,
                cols=64,
                n_slices=60,
                fracture_rate=1.0,
                patient_position=pos,
                instance_order=order,
            ),
        )
        for seed, (pos, order) in enumerate(VARIANTS)
    ]
    uids = write_rsna_dataset(root, studies, transfer_syntax="mixed")
    return root, studies, uids


def _truth(study) -> np.ndarray:
    return np.where(study.labels >= 20, 0, study.labels)


def test_layout_and_csvs(dataset):
    root, studies, uids = dataset
    assert uids == [s.study_uid for s in studies]
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
    for row, study in zip(rows, studies, strict=True):
        assert row["StudyInstanceUID"] == study.study_uid
        assert int(row["patient_overall"]) == study.patient_overall == 1
        assert {v: int(row[v]) for v in VERTEBRAE} == study.vertebra_fractured
        files = sorted((root / "train_images" / study.study_uid).glob("*.dcm"))
        assert sorted(int(p.stem) for p in files) == list(range(1, len(files) + 1))
        assert (root / "segmentations" / f"{study.study_uid}.nii").is_file()
    with open(root / "train_bounding_boxes.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    manifest = json.loads((root / "synthetic_manifest.json").read_text())
    assert [e["StudyInstanceUID"] for e in manifest["studies"]] == uids
    assert [e["seed"] for e in manifest["studies"]] == [s.seed for s in studies]
    assert {e["transfer_syntax"] for e in manifest["studies"]} >= {"explicit", "jpeg-lossless"}


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=["-".join(v) for v in VARIANTS])
def test_round_trip_label_map_equals_truth(dataset, index):
    root, studies, _ = dataset
    study = studies[index]
    ds = RSNADataset(root)
    assert ds.has_segmentation(study.study_uid)
    loaded = ds.load(study.study_uid)
    assert loaded.alignment == "header"
    assert np.array_equal(loaded.volume.hu, study.volume.hu)
    assert np.allclose(loaded.volume.affine, study.volume.affine, atol=1e-3)
    assert loaded.segmentation is not None
    assert np.array_equal(loaded.segmentation, _truth(study)), "voxel-for-voxel label map"
    assert loaded.labels == {**study.vertebra_fractured, "patient_overall": 1}
    assert np.array_equal(loaded.instance_numbers, study.instance_numbers)
    # the boxes come back on the fractured vertebra
    fractured = {VERTEBRAE.index(v) + 1 for v, x in study.vertebra_fractured.items() if x}
    assert loaded.boxes
    for box in loaded.boxes:
        k = loaded.slice_index(box["slice_number"])
        x, y, w, h = (int(box[a]) for a in ("x", "y", "width", "height"))
        region = loaded.segmentation[k, y : y + h, x : x + w]
        assert fractured & set(np.unique(region).tolist())


def test_public_notebook_transform_matches_for_head_first_superior_first(dataset):
    """``seg[:, ::-1, ::-1].transpose(2, 1, 0)`` lines up with slices sorted head to feet."""
    root, studies, _ = dataset
    study = studies[0]  # HFS, superior first
    seg = np.asanyarray(nib.load(root / "segmentations" / f"{study.study_uid}.nii").dataobj)
    conv = seg[:, ::-1, ::-1].transpose(2, 1, 0)
    order = np.argsort(study.instance_numbers)  # InstanceNumber order = head to feet here
    assert np.array_equal(conv, _truth(study)[order])


def test_inferior_first_needs_no_z_flip_as_in_the_3rd_place_code(dataset):
    """Slices numbered feet to head: ``seg[:, ::-1].transpose(2, 1, 0)`` (no z flip)."""
    root, studies, _ = dataset
    study = studies[2]  # HFS, inferior first
    seg = np.asanyarray(nib.load(root / "segmentations" / f"{study.study_uid}.nii").dataobj)
    order = np.argsort(study.instance_numbers)
    assert np.array_equal(seg[:, ::-1].transpose(2, 1, 0), _truth(study)[order])


def test_convention_fallback_without_header(dataset):
    root, studies, _ = dataset
    for study in studies:
        img = nib.load(root / "segmentations" / f"{study.study_uid}.nii")
        vol = CTVolume(hu=study.volume.hu, affine=study.volume.affine)
        seg, how = align_segmentation(np.asanyarray(img.dataobj), None, vol)
        assert how == "convention"
        if study.patient_position == "HFS":  # the convention has no left-right mirror
            assert np.array_equal(seg, _truth(study))


def test_headers_mimic_the_real_rsna_file(dataset, real_data):
    root, studies, _ = dataset
    real = pydicom.dcmread(real_data / "john-james-ai_rsna2022_slice" / "test1.dcm")
    ours = pydicom.dcmread(next((root / "train_images" / studies[0].study_uid).glob("*.dcm")))
    real_keys = {e.keyword for e in real if e.keyword}
    our_keys = {e.keyword for e in ours if e.keyword}
    assert our_keys == real_keys
    for absent in ("Modality", "SOPClassUID", "FrameOfReferenceUID", "SliceLocation"):
        assert absent not in ours
    assert "FileMetaInformationGroupLength" not in ours.file_meta
    assert "FileMetaInformationGroupLength" not in real.file_meta
    assert ours.file_meta.ImplementationClassUID == real.file_meta.ImplementationClassUID
    assert ours.SeriesInstanceUID == f"{ours.StudyInstanceUID}.1"
    assert ours.SOPInstanceUID == f"{ours.SeriesInstanceUID}.{ours.InstanceNumber}"
    assert ours.PatientID == ours.PatientName == ours.StudyInstanceUID.rsplit(".", 1)[-1]
    assert (ours.PixelRepresentation, ours.BitsStored) == (1, 16)
    assert real.SeriesInstanceUID == f"{real.StudyInstanceUID}.1"
    # mixed transfer syntaxes across studies, as in RSNA
    syntaxes = {
        str(
            pydicom.dcmread(
                next((root / "train_images" / s.study_uid).glob("*.dcm"))
            ).file_meta.TransferSyntaxUID
        )
        for s in studies
    }
    assert len(syntaxes) >= 2


def test_segmentation_subset_and_missing_segmentation(tmp_path):
    studies = [generate_study(s, StudySpec.small(rows=32, cols=32, n_slices=20)) for s in range(8)]
    write_rsna_dataset(tmp_path, studies, transfer_syntax="explicit", segmentation_fraction=0.5)
    ds = RSNADataset(tmp_path)
    with_seg = [u for u in ds.study_uids if ds.has_segmentation(u)]
    assert 0 < len(with_seg) < 8
    without = next(u for u in ds.study_uids if not ds.has_segmentation(u))
    loaded = ds.load(without)
    assert loaded.segmentation is None and loaded.alignment == ""
    assert loaded.volume.hu.shape == (20, 32, 32)


def test_reader_errors_state_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.csv"):
        RSNADataset(tmp_path)
    vol = CTVolume(hu=np.zeros((4, 5, 6), np.int16), affine=np.eye(4))
    from ai.rsna import SegmentationAlignmentError

    with pytest.raises(SegmentationAlignmentError, match="does not fit"):
        align_segmentation(np.zeros((6, 5, 3)), None, vol)


def test_cli_writes_a_dataset_the_reader_loads(tmp_path):
    from dicom_node.cli import main

    out = tmp_path / "ds"
    result = CliRunner().invoke(
        main,
        [
            "synth",
            "--out",
            str(out),
            "--layout",
            "rsna",
            "--studies",
            "3",
            "--seed",
            "5",
            "--rows",
            "48",
            "--slices",
            "30",
            "--fracture-rate",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "3 studies in RSNA layout" in result.output
    ds = RSNADataset(out)
    assert len(ds) == 3
    for uid in ds.study_uids:
        loaded = ds.load(uid)
        assert loaded.volume.hu.shape == (30, 48, 48)
        assert loaded.segmentation is not None and loaded.segmentation.max() >= 1
        assert loaded.labels["patient_overall"] == 1


def test_cli_rejects_a_bad_send_target(tmp_path):
    from dicom_node.cli import main

    result = CliRunner().invoke(
        main, ["synth", "--out", str(tmp_path), "--rows", "32", "--send", "nohostport"]
    )
    assert result.exit_code != 0
    assert "AE@HOST:PORT" in result.output


def test_cli_send_pushes_files_by_c_store(tmp_path):
    """``--send`` stores every written file on a running SCP."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from dicom_node.cli import main
    from tests.conftest import free_port

    received: list[str] = []

    def on_store(event):  # type: ignore[no-untyped-def]
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="SYNTHSCP")
    ts = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.70"]
    ae.add_supported_context(CTImageStorage, ts)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        result = CliRunner().invoke(
            main,
            [
                "synth",
                "--out",
                str(tmp_path / "p"),
                "--rows",
                "32",
                "--slices",
                "12",
                "--transfer-syntax",
                "jpeg-lossless",
                "--send",
                f"SYNTHSCP@127.0.0.1:{port}",
            ],
        )
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert len(received) == 12 and len(set(received)) == 12
    assert "sent 12 of 12" in result.output
    assert Path(tmp_path / "p").is_dir()


def test_cli_refuses_to_send_the_stripped_rsna_files(tmp_path):
    from dicom_node.cli import main

    result = CliRunner().invoke(
        main,
        [
            "synth",
            "--out",
            str(tmp_path),
            "--layout",
            "rsna",
            "--rows",
            "32",
            "--send",
            "NODE@127.0.0.1:11112",
        ],
    )
    assert result.exit_code != 0
    assert "SOP Class UID" in result.output
    assert not (tmp_path / "train.csv").exists()
