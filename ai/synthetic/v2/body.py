"""Soft tissue (painted slice by slice) and the bones around the spine (skull base,
mandible, teeth, hyoid, clavicles, manubrium, ribs) of generator v2.

Soft tissue follows the spine: every slice reads the body and canal centres of the
spine at its height (:class:`SliceGuide`) and paints anti-aliased ellipses: the outline
with its subcutaneous fat, muscles with fat planes, airway, oesophagus, thyroid, carotid
and jugular vessels (optionally contrast-enhanced, with calcified plaques), the spinal
canal and cord, lungs in the thorax and organs in the abdomen. HU values are typical
unenhanced CT values (fat -100, muscle 40-60, CSF 5-15, cord 30-40, thyroid 80-120,
lung -850, air -1000).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ai.synthetic.v2.sdf import F32, Bone, Canvas, Part, capsule, ellipsoid, rbox

SKULL_CODE, MANDIBLE_CODE, OTHER_BONE_CODE = 40, 41, 42
"""Label codes of the non-vertebral bones in v2 label maps (not RSNA codes: the RSNA
writer stores them as 0)."""


@dataclass
class SliceGuide:
    """Where the spine is on every slice (canonical z order) and the study's tissue HU.

    Attributes
    ----------
    bx, by
        Vertebral body centre (patient x, y) per slice.
    cx, cy, ca, cb
        Canal centre and half axes per slice.
    bb
        Half depth of the body per slice.
    z_fm, z_c2, z_c4, z_c6, z_t1, z_t4, z_t12
        Heights of landmarks (foramen magnum, body centres).
    hu
        Tissue HU of the study (``fat``, ``muscle``, ``csf``, ``cord``, ``brain``,
        ``vessel``, ``thyroid``, ``lung``, ``liver``, ``kidney``).
    """

    bx: np.ndarray
    by: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    ca: np.ndarray
    cb: np.ndarray
    bb: np.ndarray
    z_fm: float
    z_c2: float
    z_c4: float
    z_c6: float
    z_t1: float
    z_t4: float
    z_t12: float
    hu: dict[str, float]
    sg: float
    fat_mm: float
    neck_a: float
    neck_b: float
    plaque: float
    x_mid: float
    y_fm: float


def ellipse(
    img: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    value: float,
    px: float,
    *,
    y_min: float | None = None,
    only_below: float | None = None,
) -> None:
    """Blend an anti-aliased filled ellipse into the float32 slice ``img`` (rows = y).

    ``y_min`` restricts it to ``y > y_min`` (a posterior half); ``only_below`` changes
    only pixels darker than that value.
    """
    if a <= 0.2 or b <= 0.2:
        return
    c0, c1 = int(np.searchsorted(xs, cx - a - px)), int(np.searchsorted(xs, cx + a + px))
    r0, r1 = int(np.searchsorted(ys, cy - b - px)), int(np.searchsorted(ys, cy + b + px))
    if y_min is not None:
        r0 = max(r0, int(np.searchsorted(ys, y_min)))
    if c1 <= c0 or r1 <= r0:
        return
    qx = ((xs[c0:c1] - cx) / a).astype(F32) ** 2
    qy = ((ys[r0:r1] - cy) / b).astype(F32) ** 2
    q = np.sqrt(qy[:, None] + qx[None, :])
    w = np.clip((F32(1) - q) * F32(min(a, b) / px) + F32(0.5), 0, 1)
    sub = img[r0:r1, c0:c1]
    if only_below is not None:
        w *= sub < F32(only_below)
    sub += w * (F32(value) - sub)


def paint_slice(img: np.ndarray, cv: Canvas, k: int, g: SliceGuide, rng_tex: np.ndarray) -> None:
    """Paint the soft tissue of canonical slice ``k`` into ``img`` (float32 rows x cols)."""
    z = float(cv.z[k])
    xs, ys, px, s = cv.x, cv.y, cv.dx, g.sg
    H = g.hu
    img.fill(-1000.0)
    bx, by, cx, cy = float(g.bx[k]), float(g.by[k]), float(g.cx[k]), float(g.cy[k])
    ca, cb, bb = float(g.ca[k]), float(g.cb[k]), float(g.bb[k])
    # ---- outline: head above the foramen magnum, neck, shoulders / chest / abdomen below
    below_c6 = max(0.0, g.z_c6 - z)
    chest = float(np.clip(below_c6 / 45.0, 0, 1))
    a_n = g.neck_a + chest * (150.0 * s - g.neck_a)
    b_n = g.neck_b + chest * (105.0 * s - g.neck_b)
    cy_n = by + 12 * s + chest * (-35.0 * s)
    f_head = float(np.clip((z - (g.z_fm - 25)) / 35.0, 0.0, 1.0))
    a_o = (1 - f_head) * a_n + f_head * 74 * s
    b_o = (1 - f_head) * b_n + f_head * 95 * s
    cx_o = (1 - f_head) * bx + f_head * g.x_mid
    cy_o = (1 - f_head) * cy_n + f_head * (g.y_fm - 18 * s)
    if g.z_t12 - 40 > z:  # abdomen: rounder, more fat
        a_o, b_o = 150 * s, 115 * s
    ellipse(img, xs, ys, cx_o, cy_o, a_o, b_o, H["fat"], px)
    fat = g.fat_mm * (1.0 + 1.2 * (z < g.z_t12 - 40))
    ellipse(img, xs, ys, cx_o, cy_o, a_o - fat, b_o - fat, H["muscle"], px)
    # jaw and floor of the mouth: soft tissue reaching forward to the mandible
    if g.z_c4 - 8 < z < g.z_fm + 5:
        t = float(np.clip((z - (g.z_c4 - 8)) / 20.0, 0, 1))
        ellipse(
            img,
            xs,
            ys,
            bx,
            by - 48 * s,
            50 * s * (0.6 + 0.4 * t),
            42 * s * t + 1,
            H["fat"],
            px,
            only_below=-500,
        )
        ellipse(
            img,
            xs,
            ys,
            bx,
            by - 46 * s,
            (44 * s) * (0.6 + 0.4 * t),
            37 * s * t,
            H["muscle"] + 8,
            px,
        )
    if z > g.z_fm - 20:  # face: maxilla region, nasal cavity and maxillary sinuses
        ellipse(
            img, xs, ys, g.x_mid, g.y_fm - 70 * s, 48 * s, 30 * s, H["muscle"], px, only_below=-500
        )
        if z > g.z_fm - 8:
            for sd in (1.0, -1.0):
                ellipse(
                    img, xs, ys, g.x_mid + sd * 22 * s, g.y_fm - 68 * s, 11 * s, 14 * s, -1000, px
                )
            ellipse(img, xs, ys, g.x_mid, g.y_fm - 72 * s, 5 * s, 16 * s, -1000, px)
    # posterior fat planes between the neck muscle layers
    if z < g.z_fm + 5 and z > g.z_t4:
        for ra, rb in ((28 * s, 26 * s), (40 * s, 38 * s)):
            ellipse(img, xs, ys, cx, cy + 2, ra, rb, H["fat"] + 20, px, y_min=cy + cb + 3)
            ellipse(
                img, xs, ys, cx, cy + 2, ra - 1.6, rb - 1.6, H["muscle"] - 4, px, y_min=cy + cb + 3
            )
    in_neck = g.z_t1 - 10 < z < g.z_fm
    if in_neck:
        # sternocleidomastoids with a fat ring, carotid sheaths
        for sd in (1.0, -1.0):
            mx = bx + sd * (0.62 * a_n)
            ellipse(img, xs, ys, mx, by - 8 * s, 11 * s, 8 * s, H["fat"], px)
            ellipse(img, xs, ys, mx, by - 8 * s, 9 * s, 6 * s, H["muscle"], px)
            vx = bx + sd * 24 * s
            vy = by - bb - 8 * s
            ellipse(img, xs, ys, vx, vy, 9 * s, 7 * s, H["fat"], px)
            ellipse(img, xs, ys, vx - sd * 1.5, vy - 1, 3.4 * s, 3.4 * s, H["vessel"], px)
            ellipse(img, xs, ys, vx + sd * 5.0 * s, vy + 0.5, 5.5 * s, 4.2 * s, H["vessel"] - 5, px)
            if g.plaque > 0 and abs(z - g.z_c4) < 6:
                ang = 0.8 * sd + 0.3 * (z - g.z_c4)
                ellipse(
                    img,
                    xs,
                    ys,
                    vx - sd * 1.5 + 3.3 * s * math.cos(ang),
                    vy - 1 + 3.3 * s * math.sin(ang),
                    1.1,
                    0.9,
                    g.plaque,
                    px,
                )
    # airway, larynx, trachea, oesophagus, thyroid
    if g.z_t4 < z < g.z_fm + 12:
        low = float(np.clip((g.z_c4 - z) / (g.z_c4 - g.z_c6 + 1e-6), 0, 1))  # 0 above C4, 1 at C6
        prevert = (4.0 + 10.0 * low) * s
        if z > g.z_fm - 15:  # nasopharynx
            aa, ab = 14 * s, 7 * s
        else:
            aa, ab = (16 - 7 * low) * s, (8 + 1 * low) * s
        ay = by - bb - prevert - ab
        if g.z_c4 + 5 > z > g.z_c6 - 5:  # thyroid cartilage shield
            ellipse(
                img, xs, ys, bx, ay - 1, aa + 4.5, ab + 5.5, H["cartilage"], px, y_min=ay - ab - 8
            )
            ellipse(img, xs, ys, bx, ay - 1, aa + 2.8, ab + 3.8, H["muscle"], px, y_min=ay - ab - 8)
        if z < g.z_c6:  # trachea ring
            ellipse(img, xs, ys, bx, ay, aa + 2.0, ab + 2.0, H["cartilage"] - 60, px)
            ellipse(img, xs, ys, bx + 4 * s, by - bb - 5 * s, 7 * s, 4.5 * s, H["muscle"] - 5, px)
            if z > g.z_t1 - 25:
                for sd in (1.0, -1.0):
                    ellipse(
                        img, xs, ys, bx + sd * (aa + 9 * s), ay - 2, 7 * s, 10 * s, H["thyroid"], px
                    )
        ellipse(img, xs, ys, bx, ay, aa, ab, -1000.0, px)
    # thorax: lungs, mediastinum, heart, aorta
    if z < g.z_t1 + 15 and z > g.z_t12 - 30:
        grow = float(np.clip((g.z_t1 + 15 - z) / 50.0, 0.1, 1.0))
        shrink = float(np.clip((z - (g.z_t12 - 30)) / 40.0, 0.0, 1.0))
        for sd in (1.0, -1.0):
            ellipse(
                img,
                xs,
                ys,
                bx + sd * 68 * s,
                by - 25 * s,
                52 * s * grow,
                70 * s * grow * shrink,
                H["lung"],
                px,
            )
        if z < g.z_t4 - 15:
            ellipse(img, xs, ys, bx + 18 * s, by - 75 * s, 58 * s, 45 * s, H["vessel"], px)
        if z < g.z_t4 + 10:
            ellipse(img, xs, ys, bx + 20 * s, by - 5 * s, 12 * s, 12 * s, H["vessel"], px)
    if z < g.z_t12 + 40:  # abdomen: liver, kidneys, bowel gas, psoas
        ellipse(img, xs, ys, bx - 65 * s, by - 40 * s, 80 * s, 70 * s, H["liver"], px)
        for sd in (1.0, -1.0):
            ellipse(img, xs, ys, bx + sd * 60 * s, by + 10 * s, 25 * s, 32 * s, H["fat"], px)
            ellipse(img, xs, ys, bx + sd * 60 * s, by + 10 * s, 22 * s, 28 * s, H["kidney"], px)
            if z < g.z_t12 - 30:
                ellipse(img, xs, ys, bx + sd * 32 * s, by + 4 * s, 12 * s, 14 * s, H["muscle"], px)
        for j in range(4):
            gx = bx + 60 * math.sin(1.7 * j + 0.03 * z) * s
            gy = by - 70 * s + 25 * math.cos(2.3 * j + 0.02 * z) * s
            ellipse(img, xs, ys, gx, gy, 10 * s, 7 * s, -1000.0, px)
    # spinal canal: CSF and cord
    if z < g.z_fm + 3:
        ellipse(img, xs, ys, cx, cy, ca, cb, H["csf"], px)
        ellipse(
            img, xs, ys, cx, cy - 0.5, min(5.5 * s, ca - 1), min(4.0 * s, cb - 1), H["cord"], px
        )
    elif z < g.z_fm + 80:  # brain stem and brain above
        ellipse(
            img, xs, ys, g.x_mid, g.y_fm - 18 * s, 65 * s, 85 * s, H["brain"], px, only_below=-300
        )
    # fine fat marbling of muscle (intramuscular fat) from a seeded texture tile
    r, c = img.shape
    tile = rng_tex[k % rng_tex.shape[0]]
    muscle = np.abs(img - F32(H["muscle"])) < 25
    img += muscle * tile[:r, :c]


def head_bones(
    g: SliceGuide, c3: np.ndarray, s: float, rng: np.random.Generator, cortex: float, trab: float
) -> list[Bone]:
    """Skull base and vault, condyles, mastoids, hard palate, mandible, teeth and hyoid.

    Returns bones in world coordinates (centre at the origin, identity frame).
    """
    x0, yf, zf = g.x_mid, g.y_fm, g.z_fm
    bones: list[Bone] = []
    EYE = np.eye(3)
    # ---- skull: vault shell above a floor rising anteriorly (clivus), posteriorly and
    # laterally (posterior fossa), with the foramen magnum cut out
    A, B, C = 70 * s, 88 * s, 66 * s
    cz, cyv = zf + 32 * s, yf - 18 * s
    t = rng.uniform(5.0, 8.0)

    def floor(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        yr = y - np.float32(yf)
        xr = np.abs(x - np.float32(x0))
        post = np.maximum(yr - 16.0 * s, 0)
        lat = np.maximum(xr - 12.0 * s, 0)
        return (
            np.float32(zf)
            + np.maximum(-17.0 * s - yr, 0) * F32(1.6)
            + post * F32(0.3)
            + post * post * F32(0.012)
            + lat * F32(0.12)
            + lat * lat * F32(0.009)
        )

    def skull_fn(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        q = np.sqrt(
            ((u - F32(x0)) / F32(A)) ** 2
            + ((v - F32(cyv)) / F32(B)) ** 2
            + ((w - F32(cz)) / F32(C)) ** 2
        )
        d_ell = (q - 1) * F32(A)
        shell = np.abs(d_ell + F32(t / 2)) - F32(t / 2)
        fl = floor(u, v)
        above = fl - w
        vault = np.maximum(shell, above)
        plate = (np.abs(w - fl - F32(2.5)) - F32(2.5)) * F32(0.7)
        plate = np.maximum(plate, d_ell)
        fm = np.sqrt(((u - F32(x0)) / F32(15 * s)) ** 2 + ((v - F32(yf)) / F32(18 * s)) ** 2) - 1
        plate = np.maximum(plate, -fm * F32(15 * s))
        return np.minimum(vault, plate)

    lo = np.array([x0 - A - 2, cyv - B - 2, zf - 2])
    hi = np.array([x0 + A + 2, cyv + B + 2, cz + C + 2])
    parts = [Part(skull_fn, lo, hi, 0.0)]
    parts.append(
        capsule(
            (x0, yf - 19 * s, zf + 2),
            (x0, yf - 36 * s, zf + 36 * s),
            5.5,
            6.5,
            squash=(3.0, 1.0, 1.0),
            blend=3.0,
        )
    )
    for sd in (1.0, -1.0):
        parts.append(
            ellipsoid((x0 + sd * 12 * s, yf - 4 * s, zf - 2.5), (6 * s, 11 * s, 5.5 * s), blend=2.5)
        )
        parts.append(
            ellipsoid((x0 + sd * 48 * s, yf + 6 * s, zf - 4), (8 * s, 10 * s, 14 * s), blend=4.0)
        )
    parts.append(rbox((x0, yf - 66 * s, zf - 10 * s), (19 * s, 24 * s, 3.0), 2.5, blend=2.5))
    bones.append(
        Bone(
            "skull",
            SKULL_CODE,
            np.zeros(3),
            EYE,
            parts,
            cortex_mm=1.8,
            cortex_hu=cortex + 150,
            trab_hu=trab + 150,
        )
    )
    # ---- mandible: a horseshoe body and two rami up to the condyles
    yc = yf - 78 * s
    z_body = g.z_c4 + 4 * s
    W = rng.uniform(40, 47) * s
    mparts: list[Part] = []
    n = 7
    arc = [
        (x0 + W * math.sin(a), yc + 55 * s * (1 - math.cos(a)) ** 1.2, z_body)
        for a in np.linspace(-1.45, 1.45, n)
    ]
    for p0, p1 in itertools.pairwise(arc):
        mparts.append(capsule(p0, p1, 4.2 * s, squash=(1.0, 1.0, 3.0), blend=2.0))
    for sd in (1.0, -1.0):
        angle = (
            x0 + sd * W * math.sin(1.45),
            yc + 55 * s * (1 - math.cos(1.45)) ** 1.2,
            z_body - 4,
        )
        cond = (x0 + sd * 49 * s, yf - 16 * s, zf + 4 * s)
        mparts.append(capsule(angle, cond, 4.0 * s, 3.0 * s, squash=(1.0, 3.2, 1.0), blend=2.0))
        mparts.append(ellipsoid(cond, (9 * s, 4.5 * s, 4.5 * s)))
    bones.append(
        Bone(
            "mandible",
            MANDIBLE_CODE,
            np.zeros(3),
            EYE,
            mparts,
            cortex_mm=2.2,
            cortex_hu=cortex + 100,
            trab_hu=trab + 80,
        )
    )
    # ---- teeth: upper and lower arcs
    for z_t, y_off, W_t in (
        (zf - 20 * s, yc + 2 * s, W * 0.78),
        (z_body + 13 * s, yc + 3 * s, W * 0.8),
    ):
        for a in np.linspace(-1.25, 1.25, 14):
            p = (x0 + W_t * math.sin(a), y_off + 45 * s * (1 - math.cos(a)) ** 1.2, z_t)
            bones.append(
                Bone(
                    "tooth",
                    OTHER_BONE_CODE,
                    np.zeros(3),
                    EYE,
                    [ellipsoid(p, (3.2 * s, 3.6 * s, 5.5 * s), blend=0.5)],
                    cortex_mm=1.0,
                    cortex_hu=2600,
                    trab_hu=1700,
                    texture_gain=0.0,
                    marrow=0.0,
                )
            )
    # ---- hyoid at C3
    hx, hy, hz = float(c3[0]), float(c3[1]) - 34 * s, float(c3[2])
    hparts = [capsule((hx - 9 * s, hy, hz), (hx + 9 * s, hy, hz), 2.2, squash=(1, 1, 2.0))]
    for sd in (1.0, -1.0):
        hparts.append(
            capsule((hx + sd * 9 * s, hy, hz), (hx + sd * 19 * s, hy + 16 * s, hz + 3), 1.8, 1.2)
        )
    bones.append(
        Bone(
            "hyoid",
            OTHER_BONE_CODE,
            np.zeros(3),
            EYE,
            hparts,
            cortex_mm=1.0,
            cortex_hu=cortex,
            trab_hu=trab,
        )
    )
    return bones


def girdle_bones(
    t_pos: dict[str, np.ndarray],
    tp_span: dict[str, float],
    s: float,
    cortex: float,
    trab: float,
    n_ribs: int,
) -> list[Bone]:
    """Clavicles, manubrium and the first ``n_ribs`` rib pairs (world coordinates)."""
    EYE = np.eye(3)
    bones: list[Bone] = []
    t1 = t_pos["T1"]
    xa, ya, za = t1[0], t1[1] - 62 * s, t1[2] + 4 * s
    parts = [rbox((xa, ya + 6, za - 26 * s), (24 * s, 6 * s, 20 * s), 3.0)]
    bones.append(
        Bone(
            "manubrium",
            OTHER_BONE_CODE,
            np.zeros(3),
            EYE,
            parts,
            cortex_mm=1.2,
            cortex_hu=cortex - 100,
            trab_hu=trab,
        )
    )
    for sd in (1.0, -1.0):
        pts = [
            (xa + sd * 14 * s, ya - 2, za + 2),
            (xa + sd * 55 * s, ya - 4, za + 6),
            (xa + sd * 100 * s, ya + 18 * s, za + 14),
            (xa + sd * 140 * s, ya + 42 * s, za + 20),
        ]
        cparts = [
            capsule(p0, p1, 6.0 * s, 5.0 * s, squash=(1, 1, 0.9), blend=2.0)
            for p0, p1 in itertools.pairwise(pts)
        ]
        bones.append(
            Bone(
                "clavicle",
                OTHER_BONE_CODE,
                np.zeros(3),
                EYE,
                cparts,
                cortex_mm=1.8,
                cortex_hu=cortex,
                trab_hu=trab,
            )
        )
    for i in range(1, n_ribs + 1):
        name = f"T{i}"
        if name not in t_pos:
            continue
        c = t_pos[name]
        span = tp_span[name] / 2
        R_lat = (55 + 9 * min(i, 7)) * s if i > 1 else 52 * s
        depth = (70 + 12 * min(i, 7)) * s if i > 1 else 60 * s
        drop = (18 + 5 * min(i, 8)) * s
        for sd in (1.0, -1.0):
            pts = [(c[0] + sd * 8, c[1] + 6, c[2])]
            for a in np.linspace(0.15, 2.6, 7):
                x = c[0] + sd * (
                    span * 0.6
                    + (R_lat - span * 0.6) * math.sin(min(a, math.pi / 2))
                    - (a > math.pi / 2) * 22 * s * (a - math.pi / 2)
                )
                y = c[1] + 10 * s - depth * (1 - math.cos(a)) / 1.4
                pts.append((x, y, c[2] - drop * a / 2.6))
            r = (5.0 if i == 1 else 4.0) * s
            rparts = [
                capsule(p0, p1, r, squash=(1.0, 1.0, 1.6 if i > 1 else 0.8), blend=1.5)
                for p0, p1 in itertools.pairwise(pts)
            ]
            bones.append(
                Bone(
                    f"rib{i}",
                    OTHER_BONE_CODE,
                    np.zeros(3),
                    EYE,
                    rparts,
                    cortex_mm=1.0,
                    cortex_hu=cortex - 100,
                    trab_hu=trab,
                )
            )
    return bones
