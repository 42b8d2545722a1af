"""Screenshots of the node's outputs in OHIF, for the docs.

Run: ``.venv/bin/python -m tests.interop.ohif_screens docs/images`` (needs what
``tests/interop/test_ohif.py`` needs: ``make test`` installs it). It opens the synthetic
study of the browser test in OHIF as a radiologist would and writes:

* ``ohif_seg_c1.png``: the SEG over the CT at the middle of C1 (the fractured level), with
  OHIF's segmentation panel open;
* ``ohif_seg_c4.png``: the same at the middle of C4;
* ``ohif_summary.png``: the summary image;
* ``ohif_sr_tags.png``: OHIF's Tag Browser on the SR, searched for ``NumericValue`` (every
  number of the SR, the patient's probability and the threshold included);
* ``ohif_sr_c1.png``: the SR opened: C1 outlined on its CT slice with its probability
  (the first of the findings the SR viewport's arrows step through).

Each overlay is checked against the phantom's truth before it is saved.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.interop.ohif import (
    SEGMENTATION_SHOWN,
    SR_DRAWN,
    SR_LOADED,
    ViewerSession,
    check_overlay,
    click_selector,
    outline_on_edge,
    outline_slices,
    shows_image,
)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, ViewerSession(Path(tmp)) as viewer:
        viewer.open_study()
        viewer.open_series("SEG", SEGMENTATION_SHOWN)
        click_selector(viewer.page, '[data-cy="panelSegmentation-btn"]')
        study = viewer.truth
        for name in ("C1", "C4"):
            zs = np.nonzero((study.labels == int(name[1])).any(axis=(1, 2)))[0]
            viewer.show_slice(int(zs[len(zs) // 2]))
            path = out / f"ohif_seg_{name.lower()}.png"
            check = check_overlay(viewer.page.screenshot(path), viewer.state(), study)
            if check.inside.get(name, 0.0) < 0.97:
                raise SystemExit(f"{path}: {name} drawn outside its bone: {check}")
            print(f"{path}: {check.pixels[name]} pixels of {name}, {check.inside[name]:.1%} inside")
        viewer.open_series("OT", shows_image(study.uids["summary"]))
        viewer.page.screenshot(out / "ohif_summary.png")
        print(out / "ohif_summary.png")
        viewer.open_tag_browser("SR", "NumericValue")
        viewer.page.evaluate("document.activeElement.blur()")  # no blinking caret
        viewer.settle()
        viewer.page.screenshot(out / "ohif_sr_tags.png")
        print(out / "ohif_sr_tags.png")
        viewer.close_dialog()
        viewer.open_series("SR", SR_LOADED)
        slice_uid = outline_slices(study.sr_path)["C1"]
        viewer.page.wait_for(shows_image(slice_uid), 15, "C1's slice in the SR viewport")
        viewer.settle()
        path = out / "ohif_sr_c1.png"
        (line,) = viewer.page.evaluate(SR_DRAWN)["lines"]
        on_edge = outline_on_edge(line, viewer.state(), study, "C1")
        if on_edge < 0.95:
            raise SystemExit(f"{path}: only {on_edge:.0%} of C1's outline on its segment's edge")
        viewer.page.screenshot(path)
        print(f"{path}: C1's outline, {on_edge:.0%} of it on the segment's edge")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
