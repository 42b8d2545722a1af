"""Side-by-side figure: a mid-sagittal v2 phantom next to a real neck CT, same window.

Regenerate with::

    .venv/bin/python -m ai.synthetic.figure_v2 \\
        --real ../shared/data/real/ababier_open-kbp/ct/pt_146_ct.nii.gz \\
        --out docs/images/phantom_v2_vs_real.png

Panels (anterior left, superior up, the same millimetres per pixel, bone window
W1800/L400): the phantom at its own resolution, the same phantom resampled to the real
CT's voxel size (the real OpenKBP CTs are 3.8-5.1 mm in-plane), and the real CT through
its spinal-cord contour. Each panel is centred on C4 (the real one: 60 mm below the top
of the cord contour, 20 mm anterior of the cord). Only the rendered PNG is written; no
real voxel data goes into the repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ai.synthetic.spec import StudySpec
from ai.synthetic.v2 import generate_study_v2

WINDOW = (400.0 - 900.0, 400.0 + 900.0)
"""Bone window W1800/L400 as (low, high) HU."""

PX_MM = 0.5
"""Display scale: millimetres per figure pixel."""

PANEL_MM = (180.0, 230.0)
"""Panel size (antero-posterior, cranio-caudal) in mm."""


def _panel(
    img: np.ndarray, spacing: tuple[float, float], centre: tuple[float, float]
) -> np.ndarray:
    """Crop a sagittal image (rows superior->inferior, cols anterior->posterior) in mm."""
    h, w = round(PANEL_MM[1] / PX_MM), round(PANEL_MM[0] / PX_MM)
    rr = centre[0] + (np.arange(h) - h / 2) * PX_MM
    cc = centre[1] + (np.arange(w) - w / 2) * PX_MM
    coords = np.meshgrid(rr / spacing[0], cc / spacing[1], indexing="ij")
    out = ndimage.map_coordinates(img.astype(np.float32), coords, order=1, cval=-1000.0)
    lo, hi = WINDOW
    return (np.clip((out - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def phantom_sagittal(seed: int) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Mid-sagittal slice of a 512x512 v2 neck phantom, its spacing and the C4 centre (mm)."""
    spec = StudySpec(fracture_rate=0.0, field_of_view="full", patient_position="HFS")
    study = generate_study_v2(seed, spec)
    hu, lab = study.volume.hu, study.labels
    dz, dy, _ = study.volume.spacing
    cervical = np.nonzero((lab >= 1) & (lab <= 7))
    col = int(np.median(cervical[2]))
    sag = hu[::-1, :, col]  # rows: superior first; columns: anterior first
    k4, j4, _ = np.nonzero(lab == 4)
    centre = ((hu.shape[0] - 1 - k4.mean()) * dz, j4.mean() * dy)
    return sag, (dz, dy), centre


def real_sagittal(ct: Path) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Sagittal slice of a real OpenKBP CT through its cord contour, spacing, centre (mm)."""
    img = nib.as_closest_canonical(nib.load(str(ct)))
    data = np.asarray(img.dataobj)  # canonical RAS: i -> right, j -> anterior, k -> superior
    zooms = img.header.get_zooms()
    structures = ct.parent.parent / "structures" / ct.name.replace("_ct", "_structures")
    seg = np.asarray(nib.as_closest_canonical(nib.load(str(structures))).dataobj)
    ci, cj, ck = np.nonzero(seg == 102)  # spinal cord
    col = int(np.median(ci))
    sag = data[col].T[::-1, ::-1]  # rows: superior first; columns: anterior first
    top = ck.max()
    sz, sy = float(zooms[2]), float(zooms[1])
    k_c4 = top - 60.0 / sz
    near = np.abs(ck - k_c4) < 3
    j_cord = cj[near].mean() if near.any() else cj.mean()
    rows = (data.shape[2] - 1 - k_c4) * sz
    cols = (data.shape[1] - 1 - j_cord) * sy - 20.0
    return sag, (sz, sy), (rows, cols)


def make_figure(real: Path, out: Path, seed: int = 7) -> Path:
    """Render the three panels and write ``out`` (PNG)."""
    sag, sp, centre = phantom_sagittal(seed)
    rsag, rsp, rcentre = real_sagittal(real)
    native = _panel(sag, sp, centre)
    zoom = (sp[0] / rsp[0], sp[1] / rsp[1])
    coarse = ndimage.zoom(
        ndimage.gaussian_filter(sag.astype(np.float32), (1 / zoom[0] / 2.5, 1 / zoom[1] / 2.5)),
        zoom,
        order=1,
    )
    low = _panel(coarse, rsp, centre)
    realp = _panel(rsag, rsp, rcentre)
    gap = np.zeros((native.shape[0], 8), np.uint8)
    strip = np.concatenate([native, gap, low, gap, realp], axis=1)
    canvas = np.zeros((strip.shape[0] + 22, strip.shape[1]), np.uint8)
    canvas[22:] = strip
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    w = native.shape[1] + 8
    labels = (
        f"v2 phantom (seed {seed}), {sp[1]:.2f} mm",
        f"same phantom at {rsp[1]:.1f} x {rsp[0]:.1f} mm",
        f"real CT {real.name.split('_ct')[0]}, {rsp[1]:.1f} x {rsp[0]:.1f} mm",
    )
    for i, text in enumerate(labels):
        draw.text((i * w + 4, 5), text, fill=255)
    draw.text((4, canvas.shape[0] - 14), "W1800/L400, anterior left", fill=200)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m ai.synthetic.figure_v2 --real CT.nii.gz --out FIG.png``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", required=True, type=Path, help="real OpenKBP CT (NIfTI)")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--seed", type=int, default=7, help="phantom seed")
    args = parser.parse_args(argv)
    print(make_figure(args.real, args.out, args.seed))


if __name__ == "__main__":
    main()
