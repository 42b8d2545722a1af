"""PNG previews of a synthetic study (axial, sagittal, coronal) with the label overlay.

Uses pillow only. Display convention: radiological (patient right on the left of the
image, anterior up on axial, head up on sagittal and coronal), bone window, pixels
resampled to square millimetres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ai.synthetic.spec import SyntheticStudy
from ai.types import VERTEBRAE

COLOURS: dict[int, tuple[int, int, int]] = {
    1: (230, 25, 75), 2: (60, 180, 75), 3: (255, 225, 25), 4: (0, 130, 200),
    5: (245, 130, 48), 6: (145, 30, 180), 7: (70, 240, 240), 8: (170, 170, 255),
    9: (170, 170, 255), 10: (170, 170, 255), 11: (170, 170, 255),
}  # fmt: skip
"""Overlay colour per label code (C1..C7 distinct, thoracic pale blue, skull none)."""


def _canonical(study: SyntheticStudy) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """HU and labels with slices ascending in z and columns ascending in x (LPS)."""
    hu, lab, aff = study.volume.hu, study.labels, study.volume.affine
    flip_k, flip_i = aff[2, 0] < 0, aff[0, 2] < 0
    if flip_k:
        hu, lab = hu[::-1], lab[::-1]
    if flip_i:
        hu, lab = hu[:, :, ::-1], lab[:, :, ::-1]
    return hu, lab, bool(flip_k), bool(flip_i)


def _window(a: np.ndarray, centre: float = 450.0, width: float = 1800.0) -> np.ndarray:
    lo = centre - width / 2
    return (np.clip((a.astype(np.float32) - lo) / width, 0, 1) * 255).astype(np.uint8)


def _overlay(grey: np.ndarray, labels: np.ndarray, alpha: float = 0.32) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for code, colour in COLOURS.items():
        m = labels == code
        if m.any():
            rgb[m] = (1 - alpha) * rgb[m] + alpha * np.array(colour, np.float32)
    return rgb.astype(np.uint8)


def _resize(img: Image.Image, sx: float, sy: float, scale: float) -> Image.Image:
    w, h = img.size
    return img.resize(
        (max(1, round(w * sx * scale)), max(1, round(h * sy * scale))), Image.Resampling.BILINEAR
    )


def render_previews(
    study: SyntheticStudy,
    out_dir: str | Path,
    prefix: str = "synthetic",
    size: int = 512,
    fracture: int = 0,
    axial_crop_mm: float | None = 120.0,
) -> list[Path]:
    """Write ``<prefix>_axial.png``, ``_sagittal.png`` and ``_coronal.png`` into ``out_dir``.

    Planes go through fracture number ``fracture`` (its middle box) when the study has
    fractures, otherwise through C4. Fracture boxes are drawn in red on the axial image
    and as their extent on the other two. The axial image is cropped to a square of
    ``axial_crop_mm`` around the vertebra (None: the whole slice).

    Returns
    -------
    list[pathlib.Path]
        The three files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hu, lab, flip_k, flip_i = _canonical(study)
    S, _, C = hu.shape
    dz, dy, dx = study.volume.spacing
    boxes = []
    if study.fractures:
        fr = study.fractures[min(fracture, len(study.fractures) - 1)]
        for x, y, w, h, n in fr.boxes:
            k = int(np.nonzero(study.instance_numbers == n)[0][0])
            k = S - 1 - k if flip_k else k
            if flip_i:
                x = C - x - w
            boxes.append((x, y, w, h, k))
        code = VERTEBRAE.index(fr.vertebra) + 1
    else:
        code = 4
    if boxes:
        x, y, w, h, k = boxes[len(boxes) // 2]
        col, row = x + w // 2, y + h // 2
    else:
        sel = np.nonzero(lab == code)
        if not sel[0].size:
            sel = np.nonzero((lab > 0) & (lab < 20))
        k, row, col = (int(np.median(a)) for a in sel)
    body = np.nonzero(lab[k] == code)
    body_row = int(np.percentile(body[0], 35)) if body[0].size else row
    spine_col = int(np.median(body[1])) if body[1].size else col
    planes = {
        "axial": (_overlay(_window(hu[k]), lab[k]), dx, dy),
        "sagittal": (_overlay(_window(hu[::-1, :, spine_col]), lab[::-1, :, spine_col]), dy, dz),
        "coronal": (_overlay(_window(hu[::-1, body_row, :]), lab[::-1, body_row, :]), dx, dz),
    }
    paths = []
    for name, (rgb, sx, sy) in planes.items():
        img = Image.fromarray(rgb)
        draw = ImageDraw.Draw(img)
        if name == "axial":
            for bx, by, bw, bh, bk in boxes:
                if bk == k:
                    draw.rectangle([bx, by, bx + bw - 1, by + bh - 1], outline=(255, 0, 0))
        elif boxes:
            ks = [S - 1 - b[4] for b in boxes]
            if name == "sagittal":
                lo, hi = min(b[1] for b in boxes), max(b[1] + b[3] for b in boxes)
            else:
                lo, hi = min(b[0] for b in boxes), max(b[0] + b[2] for b in boxes)
            draw.rectangle([lo, min(ks), hi - 1, max(ks)], outline=(255, 0, 0))
        if name == "axial" and axial_crop_mm is not None:
            half = round(axial_crop_mm / 2 / dx)
            cx = spine_col
            cy = int(np.median(body[0])) if body[0].size else row
            img = img.crop((cx - half, cy - half, cx + half, cy + half))
        scale = size / max(img.size[0] * sx, img.size[1] * sy)
        img = _resize(img, sx, sy, scale)
        path = out / f"{prefix}_{name}.png"
        img.save(path, optimize=True)
        paths.append(path)
    return paths
