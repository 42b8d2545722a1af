"""Synthetic generator v2: determinism, labels, fracture boxes, HU of the tissues, fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from ai.rsna import RSNADataset
from ai.synthetic import StudySpec, write_series
from ai.synthetic.v2 import V2_FRACTURE_KINDS, V2Options, generate_study_v2
from ai.types import VERTEBRAE
from ai.volume import load_series

NECK = StudySpec.small(rows=80, cols=80, n_slices=72, fracture_rate=1.0, field_of_view="full")


def _z_of_slices(study) -> np.ndarray:
    aff = study.volume.affine
    return aff[2, 3] + aff[2, 0] * np.arange(study.volume.hu.shape[0])


@pytest.fixture(scope="module")
def studies():
    """Small fractured neck studies over several seeds (orientations vary with the seed)."""
    return [generate_study_v2(seed, NECK) for seed in range(5)]


def test_same_seed_gives_the_same_study():
    spec = StudySpec.small(rows=48, cols=48, n_slices=24)
    a, b = generate_study_v2(11, spec), generate_study_v2(11, spec)
    assert np.array_equal(a.volume.hu, b.volume.hu)
    assert np.array_equal(a.labels, b.labels)
    assert a.details == b.details and a.study_uid == b.study_uid
    c = generate_study_v2(12, spec)
    assert not np.array_equal(a.volume.hu, c.volume.hu)


def test_neck_labels_c1_to_c7_descend(studies):
    for study in studies:
        assert study.generator == "v2" and study.body_field == "neck"
        z = _z_of_slices(study)
        centres = []
        for code, name in enumerate(VERTEBRAE, start=1):
            mask = study.labels == code
            if study.coverage[name] >= 0.95:
                assert mask.any(), f"{name} is in the field of view but unlabelled"
            if mask.any():
                centres.append(float(z[np.nonzero(mask)[0]].mean()))
        assert len(centres) == 7, "a full neck field shows C1..C7"
        assert np.all(np.diff(centres) < 0), f"C1..C7 must descend in z, got {centres}"
        cervical = (study.labels >= 1) & (study.labels <= 7)
        assert np.median(study.volume.hu[cervical]) >= 150


def test_fracture_boxes_lie_within_their_vertebra(studies):
    n_boxes = 0
    for study in studies:
        assert study.patient_overall == 1
        assert {f.vertebra for f in study.fractures} == {
            v for v, x in study.vertebra_fractured.items() if x
        }
        recorded = {(r["vertebra"], r["kind"]) for r in study.details["fracture_details"]}
        assert recorded == {(f.vertebra, f.kind) for f in study.fractures}
        for fr in study.fractures:
            assert fr.kind in V2_FRACTURE_KINDS and fr.boxes
            code = VERTEBRAE.index(fr.vertebra) + 1
            for x, y, w, h, slice_number in fr.boxes:
                k = int(np.nonzero(study.instance_numbers == slice_number)[0][0])
                region = study.labels[k, y : y + h, x : x + w]
                assert (region == code).sum() >= 2, f"{fr.kind} box off {fr.vertebra}"
                n_boxes += 1
    assert n_boxes > 10


@pytest.mark.parametrize(
    ("kind", "level"), [("jefferson", "C1"), ("dens_break", "C2"), ("teardrop", None)]
)
def test_each_v2_kind_is_drawn_where_it_belongs(kind, level):
    opts = V2Options(fracture_kinds=(kind,))
    spec = StudySpec.small(
        rows=64, cols=64, n_slices=60, fracture_rate=1.0, field_of_view="full", noise_hu=0.0
    )
    seen = []
    for seed in range(4):
        study = generate_study_v2(seed, spec, opts)
        seen += [f for f in study.fractures if f.kind == kind]
    assert seen, f"no {kind} drawn"
    if level is not None:
        assert {f.vertebra for f in seen} == {level}


def test_tissue_hu_order_on_the_output():
    """cortex > trabecular bone > soft tissue > fat > air, measured on the image."""
    spec = StudySpec.small(
        rows=128, cols=128, n_slices=48, fov_mm=(180.0, 180.0), slice_spacing=(1.0, 1.0),
        field_of_view="c1_c5", noise_hu=0.0, blur=False, fracture_rate=0.0,
    )  # fmt: skip
    study = generate_study_v2(3, spec)
    hu, lab = study.volume.hu.astype(float), study.labels
    bone = (lab >= 1) & (lab <= 7)
    deep = ndimage.binary_erosion(bone, iterations=2)
    cortex = bone & ~ndimage.binary_erosion(bone, iterations=1)
    body = ndimage.binary_fill_holes(hu > -400, structure=np.ones((1, 3, 3)))
    ring = np.ones((1, 3, 3))
    fat_ring = ndimage.binary_erosion(body, ring, iterations=1) & ~ndimage.binary_erosion(
        body, ring, iterations=4
    )
    far_from_bone = ~ndimage.binary_dilation(lab > 0, np.ones((1, 3, 3)), iterations=4)
    soft = (
        ndimage.binary_erosion(body, np.ones((1, 3, 3)), iterations=14)
        & far_from_bone
        & (hu > -300)
    )
    air = ~ndimage.binary_dilation(body, np.ones((1, 3, 3)), iterations=2)
    m = {
        "cortex": np.percentile(hu[cortex], 90),
        "trabecular": np.median(hu[deep]),
        "soft": np.median(hu[soft]),
        "fat": np.median(hu[fat_ring]),
        "air": np.median(hu[air]),
    }
    assert m["cortex"] > m["trabecular"] > m["soft"] > m["fat"] > m["air"], m
    assert m["cortex"] >= 700 and 60 <= m["trabecular"] <= 500, m
    assert 20 <= m["soft"] <= 90 and -130 <= m["fat"] <= -40 and m["air"] < -950, m


@pytest.mark.parametrize("body_field", ["head", "abdomen", "thorax"])
def test_out_of_scope_fields_have_no_cervical_label(body_field):
    spec = StudySpec.small(rows=48, cols=48, n_slices=40, fracture_rate=1.0)
    study = generate_study_v2(5, spec, V2Options(body_field=body_field))
    lab = study.labels
    assert not ((lab >= 1) & (lab <= 7)).any()
    assert study.patient_overall == 0 and not study.fractures
    assert not any(study.visible.values())
    if body_field == "thorax":
        assert ((lab >= 8) & (lab <= 19)).any(), "thoracic vertebrae carry RSNA codes 8..19"
    if body_field == "abdomen":
        assert ((lab >= 20) & (lab <= 24)).any(), "lumbar vertebrae carry codes 20..24"


def test_written_series_loads_back(tmp_path):
    study = generate_study_v2(4, StudySpec.small(rows=32, cols=32, n_slices=16))
    vol = load_series(write_series(study, tmp_path))
    assert np.array_equal(vol.hu, study.volume.hu)
    assert vol.source_sop_instance_uids == study.volume.source_sop_instance_uids


def test_cli_generator_v2_writes_a_dataset_the_reader_loads(tmp_path):
    from dicom_node.cli import main

    out = tmp_path / "ds"
    args = ["synth", "--out", str(out), "--layout", "rsna", "--studies", "2", "--seed", "7"]
    args += ["--rows", "48", "--slices", "30", "--fracture-rate", "1", "--generator", "v2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    ds = RSNADataset(out)
    assert len(ds) == 2
    for uid in ds.study_uids:
        loaded = ds.load(uid)
        assert loaded.volume.hu.shape == (30, 48, 48)
        assert loaded.segmentation is not None and 1 <= loaded.segmentation.max() <= 24
        assert loaded.labels["patient_overall"] == 1
    manifest = json.loads((out / "synthetic_manifest.json").read_text())
    entry = manifest["studies"][0]
    assert entry["generator"] == "v2" and entry["body_field"] == "neck"
    assert entry["fracture_details"] and "severity" in entry["fracture_details"][0]
    bad = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "x"), "--field", "head"])
    assert bad.exit_code != 0 and "--generator v2" in bad.output
