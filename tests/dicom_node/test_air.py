"""IHE AI Results (AIR) points of the SEG, SR and summary image, read back from files.

Each output is written by the node's writers for a small synthetic study, saved, and
read back with pydicom; the checks walk the raw datasets (no highdicom reader), so they
see what a PACS or viewer would see.
"""

from __future__ import annotations

import dataclasses
import re

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ai.types import ModelIdentity
from dicom_node.uids import device_uid, pipeline_device_uid
from dicom_node.writers.common import AI_PRODUCED, MANUFACTURER, contributing_equipment
from tests.dicom_node.test_writers import (
    WHEN,
    make_ct_series,
    make_result,
    save_outputs,
    write_outputs,
)

UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
DEVICE_OBSERVER_UID = ("121012", "DCM")
FINDING_SITE = ("363698007", "SCT")
TRACKING_ID = ("112039", "DCM")
TRACKING_UID = ("112040", "DCM")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Dataset]:
    """SEG, SR, summary image and not-processed SR, saved and read back with pydicom."""
    sources, hu = make_ct_series(pixels=False, seed="air")
    paths = save_outputs(write_outputs(sources, hu, make_result()), tmp_path_factory.mktemp("air"))
    return {name: pydicom.dcmread(path) for name, path in paths.items()}


def _code(item: Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


def _content_items(ds: Dataset):
    """Every SR content item of ``ds``, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _named(ds: Dataset, concept: tuple[str, str]) -> list[Dataset]:
    return [
        item
        for item in _content_items(ds)
        if "ConceptNameCodeSequence" in item and _code(item.ConceptNameCodeSequence[0]) == concept
    ]


def _measurement_groups(sr: Dataset) -> dict[str, list[Dataset]]:
    """Tracking identifier -> its measurement group containers, in document order (a
    vertebra with voxels has two: its TID 1411 group and the TID 1410 group that places
    it on a CT slice)."""
    groups: dict[str, list[Dataset]] = {}
    for item in _content_items(sr):
        if item.ValueType != "CONTAINER" or _code(item.ConceptNameCodeSequence[0]) != (
            "125007",
            "DCM",
        ):
            continue
        (tracking,) = [
            child
            for child in item.ContentSequence
            if _code(child.ConceptNameCodeSequence[0]) == TRACKING_ID
        ]
        groups.setdefault(str(tracking.TextValue), []).append(item)
    return groups


@pytest.mark.parametrize("name", ["seg", "sr", "sc", "np"])
def test_contributing_equipment_names_each_model_with_a_device_uid(files, name):
    result = make_result()
    items = [
        item
        for item in files[name].ContributingEquipmentSequence
        if item.Manufacturer == MANUFACTURER
    ]
    assert len(items) == len(result.models)
    for item, model in zip(items, result.models, strict=True):
        assert item.ManufacturerModelName == model.name
        assert item.SoftwareVersions == model.version
        assert item.DeviceUID == device_uid(model.name, model.version, model.sha256)
        assert UID.fullmatch(item.DeviceUID) and len(item.DeviceUID) <= 64
        assert _code(item.PurposeOfReferenceCodeSequence[0]) == ("109102", "DCM")
        assert model.sha256[:16] in item.ContributionDescription


def test_device_uid_changes_with_each_model_package():
    model = ModelIdentity("cls-demo", "2.1.0", "ab" * 32, "stage 2", demo=True)
    same = dataclasses.replace(model, description="another description")
    retrained = dataclasses.replace(model, sha256="cd" * 32)
    released = dataclasses.replace(model, version="2.2.0")  # same weights, new package
    uids = [contributing_equipment([m], WHEN)[0].DeviceUID for m in (model, retrained, released)]
    assert len(set(uids)) == 3
    assert contributing_equipment([same], WHEN)[0].DeviceUID == uids[0]
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        device_uid("cls-demo", "2.1.0", "not a digest")


@pytest.mark.parametrize("name", ["sr", "np"])
def test_sr_is_unverified_and_identifies_tid_1500(files, name):
    sr = files[name]
    assert sr.VerificationFlag == "UNVERIFIED"
    assert "VerifyingObserverSequence" not in sr
    assert sr.CompletionFlag == "COMPLETE"
    (template,) = sr.ContentTemplateSequence
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
    assert _code(sr.ConceptNameCodeSequence[0]) == ("126000", "DCM")


def test_sr_device_observer_is_the_pipeline(files):
    result = make_result()
    expected = pipeline_device_uid(
        [device_uid(m.name, m.version, m.sha256) for m in result.models], "0.1.0"
    )
    (observer,) = _named(files["sr"], DEVICE_OBSERVER_UID)
    assert expected == observer.UID
    other = dataclasses.replace(result.models[1], sha256="ef" * 32)
    assert expected != pipeline_device_uid(
        [device_uid(m.name, m.version, m.sha256) for m in (result.models[0], other)], "0.1.0"
    )


def test_vertebra_finding_sites_come_from_cid_7603(files):
    groups = _measurement_groups(files["sr"])
    vertebrae = {f"C{n}" for n in range(1, 8)}
    assert vertebrae <= set(groups)
    cid7603 = {(c.value, c.scheme_designator) for c in codes.cid7603.concepts.values()}
    cid4 = {(c.value, c.scheme_designator) for c in codes.cid4.concepts.values()}
    for label, group in ((k, g) for k, found in groups.items() for g in found):
        (site,) = [
            child
            for child in group.ContentSequence
            if _code(child.ConceptNameCodeSequence[0]) == FINDING_SITE
        ]
        code = _code(site.ConceptCodeSequence[0])
        if label in vertebrae:
            assert code in cid7603
            assert site.ConceptCodeSequence[0].CodeMeaning == f"{label} vertebra"
        else:  # the patient-level group names the region, from CID 4 "Anatomic Region"
            assert code == ("122494005", "SCT") and code in cid4


def test_sr_tracking_uids_are_the_seg_segment_tracking_uids(files):
    seg, sr = files["seg"], files["sr"]
    segments = {str(s.TrackingID): s for s in seg.SegmentSequence}
    assert set(segments) == {"C1", "C2", "C3", "C4", "C5", "C6"}
    groups = _measurement_groups(sr)
    for label, segment in segments.items():
        # the TID 1411 group with the values, then the TID 1410 group with the outline
        assert len(groups[label]) == 2, label
        for group in groups[label]:
            (uid,) = [
                child
                for child in group.ContentSequence
                if _code(child.ConceptNameCodeSequence[0]) == TRACKING_UID
            ]
            assert segment.TrackingUID == uid.UID
        volumetric, planar = groups[label]
        refs = [
            ref
            for child in _content_items(volumetric)
            for ref in child.get("ReferencedSOPSequence", [])
            if "ReferencedSegmentNumber" in ref
        ]
        assert [r.ReferencedSOPInstanceUID for r in refs] == [seg.SOPInstanceUID]
        assert [int(r.ReferencedSegmentNumber) for r in refs] == [int(segment.SegmentNumber)]
        (region,) = [c for c in planar.ContentSequence if c.ValueType == "SCOORD"]
        assert region.GraphicType == "POLYLINE"
        (source,) = region.ContentSequence[0].ReferencedSOPSequence
        assert source.ReferencedSOPClassUID == pydicom.uid.CTImageStorage


def test_summary_image_is_marked_derived_and_ai_generated(files):
    sc = files["sc"]
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "NO"  # no patient identifier is drawn
    assert sc.RecognizableVisualFeatures == "NO"
    assert AI_PRODUCED in sc.DerivationDescription
    assert AI_PRODUCED in sc.ImageComments
    for model in make_result().models:
        assert f"{model.name} {model.version}" in sc.DerivationDescription
    assert [_code(c) for c in sc.DerivationCodeSequence] == [
        ("113072", "DCM"),  # Multiplanar reformatting
        ("113076", "DCM"),  # Segmentation
    ]
