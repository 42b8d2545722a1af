"""The node's SEG, SR and summary image in a real viewer: OHIF in headless Chromium.

OHIF's built viewer (npm ``@ohif/app``) reads a loopback Orthanc through its DICOMweb
plugin; the study is a synthetic CT with the node's outputs from the shipped demo models
(:mod:`tests.interop.ohif`). The tests do what a radiologist does (open the study,
double-click a series in the study browser) and check what the page then shows: the SEG's
colours inside the right vertebra of the phantom's truth, the summary image as written,
and the SR's per-vertebra probabilities as OHIF reads them.

OHIF 3.13.2 cannot show our SR (the last test): its SR extension expects every TID 1500
measurement group to carry spatial coordinates, and ours reference a SEG segment instead
(TID 1411, valid DICOM), so opening the SR throws in ``_checkIfCanAddMeasurementsToDisplaySet``
(``docs/operations.md``, "Our results in OHIF"). The test pins that exact failure, so a
newer OHIF that fixes it, or any other load error, fails here and is looked at.
"""

from __future__ import annotations

import re

import numpy as np
import pydicom
import pytest

from tests.conftest import ROOT
from tests.interop import ohif
from tests.interop.ohif import (
    FIND_TEXT,
    OHIF_SR_BUG,
    OHIF_VERSION,
    SEGMENTATION_SHOWN,
    SR_LOADED,
    SUMMARY_BOX,
    ViewerSession,
    check_overlay,
    click_selector,
    load_errors,
    require_viewer_tools,
    shows_image,
    summary_difference,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    """The study opened in OHIF (first image shown, welcome tour skipped)."""
    require_viewer_tools()
    with ViewerSession(tmp_path_factory.mktemp("ohif")) as session:
        session.open_study()
        yield session


def _fail_on_errors(viewer: ViewerSession, what: str) -> None:
    errors = load_errors(viewer.page.entries)
    assert not errors, f"{what}:\n" + "\n".join(str(e) for e in errors)


@pytest.mark.slow
def test_study_browser_lists_ct_and_our_three_outputs(viewer):
    text = viewer.page.text()
    for description in ("C-SPINE BONE", "C-spine SEG", "C-spine SR", "C-spine summary"):
        assert description in text, f"{description!r} not in the study browser:\n{text[:2000]}"
    _fail_on_errors(viewer, "errors while the study loaded")


@pytest.mark.slow
def test_seg_overlays_each_vertebra_inside_its_bone(viewer):
    viewer.open_series("SEG", SEGMENTATION_SHOWN)
    study = viewer.truth
    checks = [check_overlay(viewer.page.screenshot(), viewer.state(), study)]  # OHIF's jump
    for name in ("C4", "C6"):  # the middle slice of two lower vertebrae
        n = int(name[1])
        zs = np.nonzero((study.labels == n).any(axis=(1, 2)))[0]
        viewer.show_slice(int(zs[len(zs) // 2]))
        checks.append(check_overlay(viewer.page.screenshot(), viewer.state(), study))
    seen = set()
    for check in checks:
        present = {f"C{n}" for n in np.unique(study.labels[check.slice_index]) if 1 <= n <= 7}
        for name, pixels in check.pixels.items():
            if pixels < 200:  # a few anti-aliased pixels of a neighbouring colour
                continue
            assert name in present, f"slice {check.slice_index}: {name} drawn where it is not"
            # 0.998 or more when placed right; a shift of 2 voxels (1.8 mm) gives 0.9
            assert check.inside[name] >= 0.97, (
                f"slice {check.slice_index}: only {check.inside[name]:.0%} of {name}'s "
                f"{pixels} coloured pixels fall inside its bone"
            )
            seen.add(name)
    assert {"C1", "C4", "C6"} <= seen, f"segments drawn: {checks}"
    click_selector(viewer.page, '[data-cy="panelSegmentation-btn"]')  # the segment list
    missing = [n for n in study.probabilities if not viewer.page.evaluate(FIND_TEXT % f'"{n}"')]
    assert not missing, f"segments not listed in the segmentation panel: {missing}"
    _fail_on_errors(viewer, "errors while the SEG loaded")


@pytest.mark.slow
def test_summary_image_displays_as_written(viewer):
    viewer.open_series("OT", shows_image(viewer.truth.uids["summary"]))
    box = viewer.page.evaluate(SUMMARY_BOX)
    shot = viewer.page.screenshot()
    summary = pydicom.dcmread(viewer.truth.summary_path).pixel_array
    assert (box[4], box[5]) == summary.shape[:2]
    difference = summary_difference(shot, box, summary)
    # about 1 when shown as written (the viewer's corner texts); flipped 27, blank 37
    assert difference < 6, f"mean difference {difference:.1f} between shown and written"
    _fail_on_errors(viewer, "errors while the summary image loaded")


def _numeric_values(items) -> list[str]:
    """The SR's numbers as written (DS strings), in document order."""
    found = []
    for item in items:
        for value in item.get("MeasuredValueSequence", []):
            found.append(str(value["NumericValue"].repval).strip("'"))
        found += _numeric_values(item.get("ContentSequence", []))
    return found


@pytest.mark.slow
def test_sr_numbers_in_the_tag_browser(viewer):
    """The Tag Browser (menu of the SR's entry) shows every number of the SR as we wrote
    it (per-vertebra and patient probabilities, threshold): the way to read the SR in
    OHIF 3.13.2 without opening it (next test)."""
    sr = pydicom.dcmread(viewer.truth.sr_path)
    written = _numeric_values(sr.ContentSequence)
    c1 = viewer.truth.probabilities["C1"]
    assert c1 is not None and abs(float(written[0]) - c1) < 1e-6  # C1's group comes first
    text = viewer.open_tag_browser("SR", "NumericValue")
    viewer.close_dialog()
    # OHIF prints DS as a number (0.00165392470080 -> 0.0016539247008)
    shown = {float(v) for v in re.findall(r"NumericValue\s+([-+0-9.eE]+)", text)}
    missing = [v for v in written if not any(abs(float(v) - x) < 1e-12 for x in shown)]
    assert not missing, f"the SR's numbers {missing} not in the Tag Browser: {sorted(shown)}"
    _fail_on_errors(viewer, "errors in the Tag Browser")


@pytest.mark.slow
def test_sr_probabilities_as_ohif_reads_them(viewer):
    viewer.open_series("SR", SR_LOADED)
    found = viewer.sr_measurements()
    for name, p in viewer.truth.probabilities.items():
        assert name in found, f"{name} not among the SR's measurements: {found}"
        if p is not None:
            assert f"Probability {p:.2f} {{probability}}" in found[name]
    patient = viewer.truth.patient_probability
    assert patient is not None
    assert f"Probability {patient:.2f} {{probability}}" in found["patient"]
    # OHIF 3.13.2 then fails on groups without coordinates (module docstring): that and
    # nothing else
    errors = load_errors(viewer.page.entries)
    assert errors, "OHIF showed our SR without error: update docs/operations.md and this test"
    assert all(OHIF_SR_BUG in e.text or "Something went wrong" in e.text for e in errors), (
        "\n".join(str(e) for e in errors)
    )


def test_makefile_fetches_the_version_served():
    makefile = (ROOT / "Makefile").read_text()
    assert f"OHIF_VERSION := {OHIF_VERSION}\n" in makefile


def test_missing_viewer_skips_outside_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(ohif, "OHIF_CACHE", tmp_path / "absent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="make ohif"):
        require_viewer_tools()


def test_missing_viewer_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(ohif, "OHIF_CACHE", tmp_path / "absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_viewer_tools()
