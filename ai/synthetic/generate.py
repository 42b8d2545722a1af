"""Seeded, deterministic neck-CT phantom with vertebra labels and fracture truth.

How it stays fast: soft tissue is painted slice by slice from a handful of ellipses;
each vertebra is evaluated only inside its own bounding box, each primitive only inside
its own sub-box; everything is float32 in small blocks and the volume itself is int16.
Noise comes from a small seeded bank of int16 noise images shifted per slice.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ai.synthetic import anatomy
from ai.synthetic.anatomy import CODES, DISC_HEIGHT, ORDER, Template
from ai.synthetic.shapes import F32, EllCyl
from ai.synthetic.spec import (
    FIELDS_OF_VIEW,
    MANDIBLE_LABEL,
    SKULL_LABEL,
    ExtraSeries,
    Fracture,
    StudySpec,
    SyntheticStudy,
)
from ai.types import VERTEBRAE, CTVolume

logger = logging.getLogger(__name__)

UID_ROOT = "1.2.826.0.1.3680043.8.498.77"
"""Root of every synthetic UID (under pydicom's UID root; the rest is a hash of the seed)."""

FRACTURE_WEIGHT: dict[str, float] = {
    "C1": 0.8, "C2": 1.9, "C3": 0.6, "C4": 0.7, "C5": 1.0, "C6": 1.3, "C7": 1.4,
}  # fmt: skip
"""Relative fracture frequency per level (C2 and C6/C7 most often, as in trauma series)."""

HU_FAT, HU_MUSCLE, HU_DISC, HU_CSF, HU_BRAIN, HU_AIR = -100, 45, 80, 12, 36, -1000


def uid_for(seed: int, *parts: object) -> str:
    """A deterministic DICOM UID for this seed and purpose (at most 64 characters)."""
    text = "/".join(str(p) for p in (seed, *parts))
    number = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    return f"{UID_ROOT}.{number}"


def sop_uid_for(seed: int, series_uid: str, instance_number: int) -> str:
    """SOPInstanceUID that :func:`ai.synthetic.write_series` gives an instance."""
    return uid_for(seed, "sop", series_uid, instance_number)


@dataclass
class _Vertebra:
    name: str
    code: int
    centre: np.ndarray
    R: np.ndarray  # columns: local u, v, w axes in patient coordinates
    tp: Template
    cortex_mm: float
    cortex_hu: int
    cancellous_hu: int
    scale: float = 1.0
    aspect: tuple[float, float] = (1.0, 1.0)
    fracture: dict | None = None


@dataclass
class _Grid:
    x: np.ndarray  # patient x of each column (canonical: ascending)
    y: np.ndarray  # patient y of each row (ascending)
    z: np.ndarray  # patient z of each slice (ascending)
    dx: float
    dz: float
    texture: np.ndarray | None = None  # int16 trabecular texture block, tiled per vertebra


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], float)


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], float)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], float)


def _sagittal_frame(theta: float) -> np.ndarray:
    """Local axes for a curve descending with angle ``theta`` (positive: posteriorly)."""
    st, ct = math.sin(theta), math.cos(theta)
    return np.column_stack([(1.0, 0.0, 0.0), (0.0, ct, st), (0.0, -st, ct)])


class _Curve:
    """Spine centre line: arc length ``s`` (mm, downwards from the top of the C2 body)."""

    def __init__(self, ref: np.ndarray, Rg: np.ndarray, theta0: float, kappa: float) -> None:
        self.ref, self.Rg, self.theta0, self.kappa = ref, Rg, theta0, kappa
        self.ds = 0.5
        self.s = np.arange(-120.0, 260.0, self.ds)
        theta = theta0 + kappa * self.s
        i0 = round(120.0 / self.ds)
        y = np.cumsum(np.sin(theta)) * self.ds
        z = -np.cumsum(np.cos(theta)) * self.ds
        y -= y[i0]
        z -= z[i0]
        local = np.stack([np.zeros_like(y), y, z], axis=1)
        self.points = ref + local @ Rg.T

    def theta(self, s: float) -> float:
        return self.theta0 + self.kappa * s

    def at(self, s: float) -> np.ndarray:
        return np.array([np.interp(s, self.s, self.points[:, a]) for a in range(3)])

    def frame(self, s: float) -> np.ndarray:
        return self.Rg @ _sagittal_frame(self.theta(s))


def _local_coords(v: _Vertebra, grid: _Grid, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
    ks, js, is_ = box
    X = (grid.x[is_] - v.centre[0]).astype(F32)[None, None, :]
    Y = (grid.y[js] - v.centre[1]).astype(F32)[None, :, None]
    Z = (grid.z[ks] - v.centre[2]).astype(F32)[:, None, None]
    out = []
    for axis_ in range(3):
        r = v.R[:, axis_].astype(F32)
        out.append((r[0] * X + r[1] * Y) + r[2] * Z)
    return out


def _index_box(
    centre: np.ndarray, R: np.ndarray, lo: np.ndarray, hi: np.ndarray, grid: _Grid, pad: float
) -> tuple[slice, slice, slice] | None:
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    pts = centre + corners @ R.T
    pmin, pmax = pts.min(axis=0) - pad, pts.max(axis=0) + pad
    out = []
    for axis_, coords in ((2, grid.z), (1, grid.y), (0, grid.x)):
        a = int(np.searchsorted(coords, pmin[axis_], side="left"))
        b = int(np.searchsorted(coords, pmax[axis_], side="right"))
        if b <= a:
            return None
        out.append(slice(a, b))
    return (out[0], out[1], out[2])


def _sub_box(
    outer: tuple[slice, slice, slice], inner: tuple[slice, slice, slice] | None
) -> tuple[slice, slice, slice] | None:
    if inner is None:
        return None
    res = []
    for o, i in zip(outer, inner, strict=True):
        a, b = max(o.start, i.start), min(o.stop, i.stop)
        if b <= a:
            return None
        res.append(slice(a - o.start, b - o.start))
    return (res[0], res[1], res[2])


def _render_vertebra(
    v: _Vertebra, grid: _Grid, hu: np.ndarray, lab: np.ndarray
) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """Paint one vertebra; return its fracture mask (box coordinates) and box, if any."""
    lo, hi = v.tp.bounds()
    pad = v.cortex_mm + 2 * grid.dx + 2.5
    box = _index_box(v.centre, v.R, lo, hi, grid, pad)
    if box is None:
        return None
    u, vv, w = _local_coords(v, grid, box)
    gap = None
    fr = v.fracture
    if fr is not None and fr["kind"] != "compression":
        n, o, g = fr["normal"], fr["offset"], fr["gap"]
        sdist = (u * F32(n[0]) + vv * F32(n[1])) + w * F32(n[2])
        sdist -= F32(o)
        c, rad = fr["region_centre"], fr["region_radius"]
        region = ((u - F32(c[0])) ** 2 + (vv - F32(c[1])) ** 2 + (w - F32(c[2])) ** 2) < F32(
            rad * rad
        )
        if fr["kind"] == "body_break":
            region &= vv < F32(v.tp.body_back + 1.0)
        gap = region & (np.abs(sdist) <= F32(g / 2))
        frag = region & (sdist > F32(g / 2))
        dvec = fr["shift"]
        u[frag] -= F32(dvec[0])
        vv[frag] -= F32(dvec[1])
        w[frag] -= F32(dvec[2])
    d = np.full(u.shape, np.inf, dtype=F32)
    for _, prim in v.tp.prims:
        sub = _sub_box(
            box, _index_box(v.centre, v.R, prim.lo, prim.hi, grid, v.cortex_mm + grid.dx)
        )
        if sub is None:
            continue
        dv = d[sub]
        np.minimum(dv, prim.sdf(u[sub], vv[sub], w[sub]), out=dv)
    for hole in v.tp.holes:
        sub = _sub_box(box, _index_box(v.centre, v.R, hole.lo, hole.hi, grid, grid.dx))
        if sub is None:
            continue
        dv = d[sub]
        np.maximum(dv, -hole.sdf(u[sub], vv[sub], w[sub]), out=dv)
    inside = d <= 0
    if gap is not None:
        broken = gap & inside
        inside &= ~gap
    lab_box = lab[box]
    target = inside & (lab_box == 0)
    thickness = F32(max(v.cortex_mm, 0.7 * grid.dx))
    cortical = d[target] > -thickness
    values = np.where(cortical, v.cortex_hu, v.cancellous_hu).astype(np.int16)
    if grid.texture is not None:
        tex = grid.texture
        reps = [-(-n // t) for n, t in zip(target.shape, tex.shape, strict=True)]
        tiled = np.tile(tex, reps)[: target.shape[0], : target.shape[1], : target.shape[2]]
        values += np.where(cortical, 0, tiled[target]).astype(np.int16)
    mask = None
    if fr is not None and fr["kind"] == "compression":
        body: EllCyl = v.tp.body  # type: ignore[assignment]
        top = body.top(u, vv)
        band = target & (vv < F32(body.cv + body.av)) & (w > top - F32(3.0))
        extra = band[target]
        values[extra] = np.minimum(values[extra] + 300, 1900).astype(np.int16)
        mask = band
    elif gap is not None:
        mask = broken
    hu_box = hu[box]
    hu_box[target] = values
    lab_box[target] = v.code
    if mask is None:
        return None
    # A box must show bone of its vertebra: drop slices where the fracture gap is all
    # there is of it (e.g. an axial break line cutting a thin dens or process).
    margin = max(1, round(1.5 / grid.dx))
    for kk in range(mask.shape[0]):
        rows = np.nonzero(mask[kk].any(axis=1))[0]
        if rows.size == 0:
            continue
        cols = np.nonzero(mask[kk].any(axis=0))[0]
        r0, r1 = max(0, rows[0] - margin), rows[-1] + margin + 1
        c0, c1 = max(0, cols[0] - margin), cols[-1] + margin + 1
        if not (lab_box[kk, r0:r1, c0:c1] == v.code).any():
            mask[kk] = False
    return mask, box


def _paint_ellipse(
    img: np.ndarray,
    grid: _Grid,
    cx: float,
    cy: float,
    a: float,
    b: float,
    value: float,
    only_below: float | None = None,
) -> None:
    """Blend an anti-aliased filled ellipse into the float32 slice ``img``.

    With ``only_below``, only pixels currently darker than that value change (a layer
    that extends an outline without cutting through what is inside it).
    """
    px = grid.dx
    c0 = int(np.searchsorted(grid.x, cx - a - px))
    c1 = int(np.searchsorted(grid.x, cx + a + px))
    r0 = int(np.searchsorted(grid.y, cy - b - px))
    r1 = int(np.searchsorted(grid.y, cy + b + px))
    if c1 <= c0 or r1 <= r0:
        return
    qx = ((grid.x[c0:c1] - cx) / a).astype(F32) ** 2
    qy = ((grid.y[r0:r1] - cy) / b).astype(F32) ** 2
    q = qy[:, None] + qx[None, :]
    q -= 1
    q *= F32(-0.5 * min(a, b) / px)
    q += F32(0.5)
    np.clip(q, 0, 1, out=q)
    sub = img[r0:r1, c0:c1]
    if only_below is not None:
        q *= sub < F32(only_below)
    sub += q * (F32(value) - sub)


def _choose(
    rng: np.random.Generator,
    mode: str,
    options: tuple[str, ...],
    p: tuple[float, ...] | None = None,
) -> str:
    draw = str(rng.choice(list(options), p=p))
    return draw if mode == "random" else mode


def generate_study(seed: int, spec: StudySpec | None = None) -> SyntheticStudy:
    """Generate one synthetic neck CT study with its truth.

    Parameters
    ----------
    seed
        Any non-negative integer; the same seed and spec give byte-identical output.
    spec
        Study parameters (:class:`StudySpec`); the default is a 512x512 study.

    Returns
    -------
    SyntheticStudy
        Volume, labels, fractures, per-vertebra and patient labels, visibility, UIDs.
    """
    spec = spec or StudySpec()
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    rng = np.random.default_rng([seed, 20221])

    # ---------------------------------------------------------------- anatomy and pose
    sg = rng.uniform(0.88, 1.12)
    heights = {n: anatomy.BODY_HEIGHT[n] * sg * rng.uniform(0.95, 1.05) for n in ORDER[1:]}
    discs = {n: DISC_HEIGHT[n] * sg * rng.uniform(0.85, 1.15) for n in DISC_HEIGHT}
    lordosis = math.radians(rng.uniform(-5.0, 32.0))  # tangent change from C2 to C7
    kappa = lordosis / (95.0 * sg)
    theta0 = -lordosis / 2 + math.radians(rng.uniform(-8.0, 8.0))
    yaw = math.radians(rng.uniform(-4.0, 4.0))
    roll = math.radians(rng.uniform(-1.5, 1.5))
    Rg = _rot_z(yaw) @ _rot_y(roll)
    x_fc, y_fc = rng.uniform(-12, 12), rng.uniform(-40, 20)
    ref = np.array([x_fc + rng.uniform(-8, 8), y_fc + rng.uniform(-14, 2), rng.uniform(-250, 250)])
    curve = _Curve(ref, Rg, theta0, kappa)
    cortex_base = rng.uniform(1050, 1650)
    canc_base = rng.uniform(200, 330)

    s_centre: dict[str, float] = {"C1": -8.0 * sg}
    s = 0.0
    for n in ORDER[1:]:
        s_centre[n] = s + heights[n] / 2
        s += heights[n] + discs.get(n, 4.0)

    verts: list[_Vertebra] = []
    for n in ORDER:
        sc = s_centre[n]
        jitter = _rot_z(math.radians(rng.uniform(-1.2, 1.2))) @ _rot_x(
            math.radians(rng.uniform(-2.0, 2.0))
        )
        R = curve.frame(sc) @ jitter
        centre = curve.at(sc)
        if n == "C1":
            centre = centre + R[:, 1] * (-1.0 * sg)
        sv = sg * rng.uniform(0.97, 1.03)
        aspect = (float(rng.uniform(0.92, 1.08)), float(rng.uniform(0.92, 1.08)))
        verts.append(
            _Vertebra(
                name=n,
                code=CODES[n],
                centre=centre,
                R=R,
                scale=sv,
                aspect=aspect,
                tp=anatomy.template(n, sv, heights.get(n, 0.0), aspect=aspect),
                cortex_mm=rng.uniform(0.8, 1.5),
                cortex_hu=int(np.clip(cortex_base + rng.uniform(-120, 120), 1000, 1800)),
                cancellous_hu=int(np.clip(canc_base + rng.uniform(-40, 40), 190, 400)),
            )
        )
    by_name = {v.name: v for v in verts}

    def z_extent(v: _Vertebra) -> tuple[float, float]:
        lo, hi = v.tp.bounds()
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        zs = (v.centre + corners @ v.R.T)[:, 2]
        return float(zs.min()), float(zs.max())

    c1 = by_name["C1"]
    z_fm = c1.centre[2] + 9.5 * sg  # foramen magnum (floor of the posterior fossa)

    # ---------------------------------------------------------------- field of view
    fov_mode = _choose(rng, spec.field_of_view, FIELDS_OF_VIEW, (0.6, 0.25, 0.15))
    top_opts = {
        "full": z_fm + rng.uniform(15, 35),
        "no_skull": min(z_extent(c1)[1] + rng.uniform(0.5, 3.0), z_fm - 1.0),
        "c1_c5": z_fm + rng.uniform(5, 25),
    }
    bottom_opts = {
        "full": rng.uniform(by_name["T2"].centre[2] - 6, by_name["T1"].centre[2]),
        "no_skull": rng.uniform(by_name["T2"].centre[2] - 6, by_name["T1"].centre[2]),
        "c1_c5": rng.uniform(by_name["C6"].centre[2], by_name["C5"].centre[2] - 5),
    }
    z_top, z_bot = top_opts[fov_mode], bottom_opts[fov_mode]
    lo_sp, hi_sp = spec.slice_spacing
    if spec.n_slices is None:
        dz = rng.uniform(lo_sp, hi_sp)
        n_slices = math.floor((z_top - z_bot) / dz) + 1
    else:
        n_slices = spec.n_slices
        dz = float(np.clip((z_top - z_bot) / (n_slices - 1), lo_sp, hi_sp))
        rng.uniform()  # keep the draw sequence independent of the branch
        if fov_mode == "no_skull":  # keep the top, grow/shrink at the bottom
            z_bot = z_top - dz * (n_slices - 1)
        else:
            mid = (z_top + z_bot) / 2
            z_top = mid + dz * (n_slices - 1) / 2
    dz = round(dz, 4)
    fov = rng.uniform(*spec.fov_mm)
    dx = round(fov / spec.cols, 5)
    thickness = round(
        float(np.clip(dz * rng.choice([1.0, 1.0, 1.25, 1.5]), lo_sp, max(hi_sp, dz))), 3
    )
    x0 = round(x_fc - (spec.cols - 1) / 2 * dx, 3)
    y0 = round(y_fc - (spec.rows - 1) / 2 * dx, 3)
    z0 = round(z_top - dz * (n_slices - 1), 3)
    grid = _Grid(
        x=x0 + dx * np.arange(spec.cols),
        y=y0 + dx * np.arange(spec.rows),
        z=z0 + dz * np.arange(n_slices),
        dx=dx,
        dz=dz,
    )
    tex = rng.normal(0.0, 1.0, size=(16, 64, 64)).astype(F32)
    ndimage.gaussian_filter(tex, sigma=(0.6, 1.0, 1.0), output=tex, mode="wrap")
    tex *= F32(35.0 / max(float(tex.std()), 1e-6))
    grid.texture = np.rint(tex).astype(np.int16)
    position = _choose(rng, spec.patient_position, ("HFS", "FFS"), (0.8, 0.2))
    order = _choose(rng, spec.instance_order, ("superior_first", "inferior_first"), (0.7, 0.3))

    # ---------------------------------------------------------------- coverage, fractures
    coverage: dict[str, float] = {}
    for v in verts[:7]:
        a, b = z_extent(v)
        inter = max(0.0, min(b, grid.z[-1]) - max(a, grid.z[0]))
        coverage[v.name] = round(inter / (b - a), 3)
    visible = {n: coverage[n] >= 0.5 for n in VERTEBRAE}
    # fractures draw from their own stream: the same seed gives the same anatomy with or
    # without them (fracture_rate 0 vs 1), which the tests use to see them in the image
    frng = np.random.default_rng([seed, 20222])
    fractured_study = frng.uniform() < spec.fracture_rate
    candidates = [n for n in VERTEBRAE if coverage[n] >= 0.95 and _kinds_for(n, spec)]
    chosen: list[str] = []
    if fractured_study and candidates:
        mean_w = np.mean(list(FRACTURE_WEIGHT.values()))
        draws = frng.uniform(size=len(VERTEBRAE))
        for i, n in enumerate(VERTEBRAE):
            p = min(1.0, spec.vertebra_fracture_rate * FRACTURE_WEIGHT[n] / mean_w)
            if n in candidates and draws[i] < p:
                chosen.append(n)
        if not chosen:
            w = np.array([FRACTURE_WEIGHT[n] for n in candidates])
            chosen.append(str(frng.choice(candidates, p=w / w.sum())))
    fractures: list[Fracture] = []
    for n in chosen:
        v = by_name[n]
        kind = str(frng.choice(_kinds_for(n, spec)))
        plan = _plan_fracture(frng, v, kind, heights.get(n, 0.0), grid.dx, sg)
        if kind == "compression":
            v.tp = anatomy.template(n, v.scale, heights[n], wedge=plan["wedge"], aspect=v.aspect)
        v.fracture = plan
        fractures.append(
            Fracture(
                vertebra=n,
                kind=kind,
                displacement_mm=round(plan.get("disp", 0.0), 2),
                height_loss=round(plan.get("loss", 0.0), 3),
            )
        )

    # ---------------------------------------------------------------- soft tissue
    S, Rr, Cc = n_slices, spec.rows, spec.cols
    # The arrays are allocated in stored order; the generator paints through views in
    # canonical order (z ascending, x ascending), so feet-first needs no copy.
    hu_stored = np.empty((S, Rr, Cc), dtype=np.int16)
    lab_stored = np.zeros((S, Rr, Cc), dtype=np.uint8)
    if position == "HFS":
        hu, lab = hu_stored, lab_stored
    else:  # feet first: the image is mirrored left-right and the normal points down
        hu, lab = hu_stored[::-1, :, ::-1], lab_stored[::-1, :, ::-1]
    fat_mm = rng.uniform(4, 9)
    neck_a, neck_b = rng.uniform(54, 64) * sg, rng.uniform(52, 60) * sg
    air_a, air_b = rng.uniform(9, 13) * sg, rng.uniform(5, 8) * sg
    pts = curve.points[::-1]  # ascending z
    zc, xc, yc = pts[:, 2], pts[:, 0], pts[:, 1]
    z_c6 = by_name["C6"].centre[2]
    head_c = (c1.centre[0], c1.centre[1] - 20.0 * sg)
    skull = dict(
        cx=c1.centre[0],
        cy=c1.centre[1] - 20.0 * sg,
        cz=z_fm + 32 * sg,
        a=70 * sg,
        b=88 * sg,
        c=66 * sg,
        t=rng.uniform(5, 8),
        xfm=c1.centre[0],
        yfm=c1.centre[1] + 10 * sg,
        zfm=z_fm,
        hu=rng.uniform(1200, 1600),
    )
    c2, c3 = by_name["C2"], by_name["C3"]
    c2_front = c2.centre[1] - 8.0 * sg
    jaw = dict(
        cx=c2.centre[0],
        y_chin=c2_front - rng.uniform(58, 72) * sg,
        y_angle=c2_front - rng.uniform(0, 8) * sg,
        W=rng.uniform(40, 47) * sg,
        z_bot=c3.centre[2] - rng.uniform(0, 6) * sg,
        height=26.0 * sg,
        z_top=z_fm - 4.0,
        half=rng.uniform(4.5, 5.5) * sg,
        hu=rng.uniform(1200, 1600),
        fat=fat_mm,
    )
    img = np.empty((Rr, Cc), dtype=F32)
    base = np.empty((Rr, Cc), dtype=F32)
    base_params: np.ndarray | None = None
    for k in range(S):
        z = grid.z[k]
        sx, sy = float(np.interp(z, zc, xc)), float(np.interp(z, zc, yc))
        body_b = 8.0 * sg
        # neck outline, widening to the shoulders, blending into the head above C1
        a_n = neck_a + max(0.0, z_c6 - z) * 1.8
        b_n = neck_b + max(0.0, z_c6 - z) * 0.35
        cy_n = sy + 12 * sg
        f = float(np.clip((z - (z_fm - 25)) / 30.0, 0.0, 1.0))
        a_o = (1 - f) * a_n + f * 74 * sg
        b_o = (1 - f) * b_n + f * 94 * sg
        cx_o = (1 - f) * sx + f * head_c[0]
        cy_o = (1 - f) * cy_n + f * head_c[1]
        tr = float(np.clip((by_name["C6"].centre[2] - z) / 20.0, 0.0, 1.0))
        with_jaw = jaw["z_bot"] - 18 <= z <= jaw["z_top"]
        params = np.array(
            [sx, sy, a_o, b_o, cx_o, cy_o, 20 * tr, 40 * with_jaw * (z - jaw["z_bot"]) / 18,
             100 * (z < z_fm + 25)]
        )  # fmt: skip
        if base_params is not None and np.max(np.abs(params - base_params)) < 0.4 * dx:
            # the soft tissue has not moved by half a pixel: reuse it, paint the bones
            img[:] = base
            _paint_bones_of_slice(img, lab[k], grid, z, z_fm, skull, jaw)
            np.rint(img, out=img)
            hu[k] = img
            continue
        base_params = params
        img.fill(HU_AIR)
        _paint_ellipse(img, grid, cx_o, cy_o, a_o, b_o, HU_FAT)
        _paint_ellipse(img, grid, cx_o, cy_o, a_o - fat_mm, b_o - fat_mm, HU_MUSCLE)
        # posterior intermuscular fat planes
        for sd in (1.0, -1.0):
            _paint_ellipse(img, grid, sx + sd * 22 * sg, sy + 38 * sg, 3.0 * sg, 9.0 * sg, -60)
        if with_jaw:
            _paint_jaw_soft_tissue(img, grid, z, jaw)
        # spinal canal (CSF) and airway
        _paint_ellipse(img, grid, sx, sy + body_b + 7.5 * sg, 10.5 * sg, 7.0 * sg, HU_CSF)
        if z < z_fm + 25:
            aa = (1 - tr) * air_a + tr * 8.5 * sg
            ab = (1 - tr) * air_b + tr * 8.0 * sg
            gap = (1 - tr) * 4.0 + tr * 13.0
            _paint_ellipse(img, grid, sx, sy - body_b - gap * sg - ab, aa, ab, HU_AIR)
        base[:] = img
        _paint_bones_of_slice(img, lab[k], grid, z, z_fm, skull, jaw)
        np.rint(img, out=img)
        hu[k] = img

    # ---------------------------------------------------------------- discs and bones
    for upper, lower in itertools.pairwise(verts):
        _render_disc(upper, lower, grid, hu, lab)
    masks = {}
    for v in verts:
        res = _render_vertebra(v, grid, hu, lab)
        if res is not None:
            masks[v.name] = res

    # ---------------------------------------------------------------- blur and noise
    spine_box = _spine_box(verts, grid)
    if spec.blur and spine_box is not None:
        region = hu[spine_box].astype(F32)
        sig_xy = 0.45 if grid.dx < 1.0 else 0.35
        ndimage.gaussian_filter(region, sigma=(0.0, sig_xy, sig_xy), output=region, truncate=2.5)
        np.rint(region, out=region)
        hu[spine_box] = region
    if spec.noise_hu > 0:
        _add_noise(hu, rng, spec.noise_hu)
    np.clip(hu, -1024, 3071, out=hu)

    # ---------------------------------------------------------------- stored orientation
    affine = np.eye(4)
    hu, lab = hu_stored, lab_stored
    if position == "HFS":
        affine[:3, 0] = (0, 0, dz)
        affine[:3, 1] = (0, dx, 0)
        affine[:3, 2] = (dx, 0, 0)
        affine[:3, 3] = (grid.x[0], grid.y[0], grid.z[0])
    else:
        affine[:3, 0] = (0, 0, -dz)
        affine[:3, 1] = (0, dx, 0)
        affine[:3, 2] = (-dx, 0, 0)
        affine[:3, 3] = (grid.x[-1], grid.y[0], grid.z[-1])
    # InstanceNumber: superior_first numbers from the highest z down
    zs_stored = affine[2, 3] + affine[2, 0] * np.arange(S)
    rank = np.argsort(np.argsort(-zs_stored if order == "superior_first" else zs_stored))
    instance_numbers = (rank + 1).astype(np.int32)

    for fr in fractures:
        mask, box = masks[fr.vertebra]
        fr.boxes = _boxes(mask, box, position, (S, Rr, Cc), instance_numbers, grid.dx)

    vf = {n: int(any(f.vertebra == n for f in fractures)) for n in VERTEBRAE}
    patient_id = f"SYN{seed:04d}"
    study = SyntheticStudy(
        seed=seed,
        spec=spec,
        volume=CTVolume(
            hu=hu,
            affine=affine,
            source_sop_instance_uids=[
                sop_uid_for(seed, uid_for(seed, "series", 1), int(i)) for i in instance_numbers
            ],
        ),
        labels=lab,
        fractures=fractures,
        vertebra_fractured=vf,
        patient_overall=int(any(vf.values())),
        visible=visible,
        coverage=coverage,
        field_of_view=fov_mode,
        patient_position=position,
        instance_numbers=instance_numbers,
        slice_thickness=thickness,
        kernel=str(rng.choice(["BONE", "B70s", "YC", "FC30"])),
        study_uid=uid_for(seed, "study"),
        series_uid=uid_for(seed, "series", 1),
        frame_of_reference_uid=uid_for(seed, "for"),
        patient_name=f"SYNTH^PHANTOM^{seed:04d}",
        patient_id=patient_id,
        study_date=f"2024{1 + seed % 12:02d}{1 + seed % 28:02d}",
    )
    if spec.extra_series:
        study.extra_series = _extra_series(study, grid)
    logger.debug("synthetic study seed=%d shape=%s fractures=%d", seed, hu.shape, len(fractures))
    return study


def _kinds_for(name: str, spec: StudySpec) -> list[str]:
    allowed = {"C1": ["arch_break"], "C2": ["dens_break", "body_break", "arch_break"]}.get(
        name, ["body_break", "arch_break", "compression"]
    )
    return [k for k in allowed if k in spec.fracture_kinds]


def _plan_fracture(
    rng: np.random.Generator, v: _Vertebra, kind: str, h: float, dx: float, sg: float
) -> dict:
    gap = max(1.0, 1.3 * dx)
    disp = float(rng.uniform(1.0, 2.5) * max(1.0, dx / 0.7))
    if kind == "compression":
        loss = float(rng.uniform(0.25, 0.45))
        return {"kind": kind, "wedge": loss * h, "loss": loss}
    if kind == "dens_break":
        top = v.tp.body.w1 if v.tp.body is not None else 6.0
        n = np.array([rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25), 1.0])
        n /= np.linalg.norm(n)
        point = np.array([0.0, -1.0 * sg, top + 2.0 * sg])
        shift = np.array([rng.uniform(-0.4, 0.4), rng.choice([-1.0, 1.0]), 0.0]) * disp
        return {
            "kind": kind,
            "normal": n,
            "offset": float(n @ point),
            "gap": gap,
            "disp": disp,
            "shift": shift,
            "region_centre": point,
            "region_radius": 9.0 * sg,
        }
    if kind == "body_break":
        phi = rng.uniform(0, math.pi)
        n = np.array([math.cos(phi), math.sin(phi), rng.uniform(-0.3, 0.3)])
        n /= np.linalg.norm(n)
        point = np.array([rng.uniform(-2, 2), rng.uniform(-2, 2), 0.0]) * sg
        t = np.cross(n, [0.0, 0.0, 1.0])
        t /= np.linalg.norm(t)
        shift = (0.8 * n + 0.6 * t) * disp
        return {
            "kind": kind,
            "normal": n,
            "offset": float(n @ point),
            "gap": gap,
            "disp": disp,
            "shift": shift,
            "region_centre": np.zeros(3),
            "region_radius": 16.0 * sg,
        }
    # arch break
    point, direction = v.tp.arch_points[int(rng.integers(len(v.tp.arch_points)))]
    n = direction / np.linalg.norm(direction)
    shift = np.array([0.0, 0.0, rng.choice([-1.0, 1.0])]) * disp * 0.6 + n * disp * 0.5
    return {
        "kind": "arch_break",
        "normal": n,
        "offset": float(n @ point),
        "gap": gap,
        "disp": disp,
        "shift": shift,
        "region_centre": point,
        "region_radius": 7.0 * sg,
    }


def _paint_skull(img: np.ndarray, lab2: np.ndarray, grid: _Grid, z: float, p: dict) -> None:
    """Occipital bone and skull base on one slice (labelled :data:`SKULL_LABEL`)."""
    dzc = (z - p["cz"]) / p["c"]
    k_o = 1.0 - dzc * dzc
    if k_o <= 0:
        return
    a_o, b_o = p["a"] * math.sqrt(k_o), p["b"] * math.sqrt(k_o)
    c0 = int(np.searchsorted(grid.x, p["cx"] - a_o))
    c1 = int(np.searchsorted(grid.x, p["cx"] + a_o))
    r0 = int(np.searchsorted(grid.y, p["cy"] - b_o))
    r1 = int(np.searchsorted(grid.y, p["cy"] + b_o))
    if c1 <= c0 or r1 <= r0:
        return
    xs = (grid.x[c0:c1] - p["cx"]).astype(F32)
    ys = (grid.y[r0:r1] - p["cy"]).astype(F32)
    q_o = (ys[:, None] / F32(p["b"])) ** 2 + (xs[None, :] / F32(p["a"])) ** 2 + F32(dzc * dzc)
    t = p["t"]
    ai, bi, ci = p["a"] - t, p["b"] - t, p["c"] - t
    q_i = (
        (ys[:, None] / F32(bi)) ** 2 + (xs[None, :] / F32(ai)) ** 2 + F32(((z - p["cz"]) / ci) ** 2)
    )
    # floor of the skull: rises anteriorly (clivus), and as a bowl posteriorly (occiput)
    # and laterally (posterior fossa)
    yr = (grid.y[r0:r1] - p["yfm"]).astype(F32)
    xr = np.abs(grid.x[c0:c1] - p["xfm"]).astype(F32)
    post = np.maximum(yr - 16.0, 0)
    lat = np.maximum(xr - 12.0, 0)
    floor = (np.maximum(-17.0 - yr, 0) * F32(1.4) + post * F32(0.3) + post * post * F32(0.012))[
        :, None
    ] + (lat * F32(0.12) + lat * lat * F32(0.009))[None, :]
    zr = F32(z - p["zfm"])
    above = zr >= floor
    t_floor = F32(4.0)
    fm = ((yr / F32(18.0)) ** 2)[:, None] + ((xr / F32(15.0)) ** 2)[None, :] < 1
    bone = (q_o < 1) & above & ((q_i >= 1) | ((zr < floor + t_floor) & ~fm))
    brain = (q_i < 1) & (zr >= floor + t_floor)
    # diploe: the middle third of the vault between the inner and outer tables
    am, bm, cm = p["a"] - t * 0.3, p["b"] - t * 0.3, p["c"] - t * 0.3
    q_m = (
        (ys[:, None] / F32(bm)) ** 2 + (xs[None, :] / F32(am)) ** 2 + F32(((z - p["cz"]) / cm) ** 2)
    )
    an, bn, cn = p["a"] - t * 0.7, p["b"] - t * 0.7, p["c"] - t * 0.7
    q_n = (
        (ys[:, None] / F32(bn)) ** 2 + (xs[None, :] / F32(an)) ** 2 + F32(((z - p["cz"]) / cn) ** 2)
    )
    diploe = bone & (q_m < 1) & (q_n >= 1)
    sub = img[r0:r1, c0:c1]
    sub[brain] = HU_BRAIN
    sub[bone] = F32(p["hu"])
    sub[diploe] = F32(p["hu"] * 0.5)
    lsub = lab2[r0:r1, c0:c1]
    lsub[bone] = SKULL_LABEL


def _paint_bones_of_slice(
    img: np.ndarray, lab2: np.ndarray, grid: _Grid, z: float, z_fm: float, skull: dict, jaw: dict
) -> None:
    """Skull base and mandible of one slice (they are bone: painted on every slice)."""
    if z > z_fm - 2:
        _paint_skull(img, lab2, grid, z, skull)
    if jaw["z_bot"] <= z <= jaw["z_top"]:
        _paint_mandible(img, lab2, grid, z, jaw)


def _paint_jaw_soft_tissue(img: np.ndarray, grid: _Grid, z: float, p: dict) -> None:
    """Floor of the mouth and submandibular soft tissue in front of the upper neck."""
    taper = float(np.clip((z - (p["z_bot"] - 18.0)) / 18.0, 0.2, 1.0))
    a = p["W"] + 20.0
    b = ((p["y_angle"] - p["y_chin"]) / 2 + 28.0) * taper
    cy = p["y_angle"] + 22.0 - b
    _paint_ellipse(img, grid, p["cx"], cy, a, b, HU_FAT, only_below=-500.0)
    _paint_ellipse(img, grid, p["cx"], cy, a - p["fat"], b - p["fat"], HU_MUSCLE)


def _paint_mandible(img: np.ndarray, lab2: np.ndarray, grid: _Grid, z: float, p: dict) -> None:
    """Mandibular body (a horseshoe) and rami on one slice (labelled :data:`MANDIBLE_LABEL`)."""
    W, half = p["W"], p["half"]
    x0, x1 = p["cx"] - W - 12.0, p["cx"] + W + 12.0
    y0, y1 = p["y_chin"] - half - 2.0, p["y_angle"] + 30.0
    c0, c1 = int(np.searchsorted(grid.x, x0)), int(np.searchsorted(grid.x, x1))
    r0, r1 = int(np.searchsorted(grid.y, y0)), int(np.searchsorted(grid.y, y1))
    if c1 <= c0 or r1 <= r0:
        return
    X = (grid.x[c0:c1] - p["cx"]).astype(F32)[None, :]
    Y = grid.y[r0:r1].astype(F32)[:, None]
    bone = np.zeros((r1 - r0, c1 - c0), bool)
    depth = np.full(bone.shape, np.inf, F32)
    zb = z - p["z_bot"]
    if 0.0 <= zb <= p["height"]:
        h = half * math.sqrt(min(1.0, zb / 3.0 + 0.15)) * (1.0 - 0.3 * zb / p["height"])
        k = (p["y_angle"] - p["y_chin"]) / (W * W)
        yc = F32(p["y_chin"]) + F32(k) * X * X
        dist = np.abs(Y - yc) / np.sqrt(1.0 + (F32(2 * k) * X) ** 2)
        body = (dist < F32(h)) & (np.abs(X) <= F32(W))
        bone |= body
        depth = np.where(body, F32(h) - dist, depth)
    if zb >= p["height"] - 12.0:
        f = float(np.clip((z - (p["z_top"] - 14.0)) / 14.0, 0.0, 1.0))
        ay, ax = 13.0 - 6.0 * f, 3.6 + 0.8 * f
        yc = p["y_angle"] - 6.0 + 0.25 * (zb - p["height"] + 12.0)
        for sd in (1.0, -1.0):
            q = ((X - F32(sd * (W + 1.5))) / F32(ax)) ** 2 + ((Y - F32(yc)) / F32(ay)) ** 2
            ramus = q < 1
            bone |= ramus
            depth = np.where(ramus, np.minimum(depth, (1 - np.sqrt(q)) * F32(ax)), depth)
    if not bone.any():
        return
    lsub = lab2[r0:r1, c0:c1]
    bone &= lsub == 0
    sub = img[r0:r1, c0:c1]
    sub[bone] = np.where(depth[bone] < 1.8, F32(p["hu"]), F32(p["hu"] * 0.35))
    lsub[bone] = MANDIBLE_LABEL


def _render_disc(
    upper: _Vertebra, lower: _Vertebra, grid: _Grid, hu: np.ndarray, lab: np.ndarray
) -> None:
    if upper.tp.body is None or lower.tp.body is None:
        return
    ub, lb = upper.tp.body, lower.tp.body
    top_u = upper.centre + upper.R[:, 2] * ub.w0
    top_l = lower.centre + lower.R[:, 2] * lb.w1
    centre = (top_u + top_l) / 2
    height = float(np.linalg.norm(top_u - top_l)) + 2.0 + lb.wedge
    a, b = (ub.au + lb.au) / 2, (ub.av + lb.av) / 2
    disc = EllCyl(0.0, 0.0, a * 0.97, b * 0.97, -height / 2, height / 2, power=2.6)
    R = lower.R
    box = _index_box(centre, R, disc.lo, disc.hi, grid, grid.dx)
    if box is None:
        return
    tmp = _Vertebra("disc", 0, centre, R, Template(), 0.0, 0, 0)
    u, v, w = _local_coords(tmp, grid, box)
    inside = (disc.sdf(u, v, w) <= 0) & (lab[box] == 0)
    hub = hu[box]
    hub[inside] = HU_DISC


def _spine_box(verts: list[_Vertebra], grid: _Grid) -> tuple[slice, slice, slice] | None:
    boxes = []
    for v in verts:
        lo, hi = v.tp.bounds()
        b = _index_box(v.centre, v.R, lo, hi, grid, 3.0)
        if b is not None:
            boxes.append(b)
    if not boxes:
        return None
    return tuple(
        slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3)
    )  # type: ignore[return-value]


def _add_noise(hu: np.ndarray, rng: np.random.Generator, sigma: float) -> None:
    S, R, C = hu.shape
    m = 16
    bank: np.ndarray = np.rint(rng.normal(0.0, sigma, size=(6, R + m, C + m))).astype(np.int16)
    picks: np.ndarray = rng.integers(0, 6, size=(S,))
    offs: np.ndarray = rng.integers(0, m, size=(S, 2))
    for k in range(S):
        oy, ox = offs[k]
        hu[k] += bank[picks[k], oy : oy + R, ox : ox + C]


def _boxes(
    mask: np.ndarray,
    box: tuple[slice, slice, slice],
    position: str,
    shape: tuple[int, int, int],
    inst: np.ndarray,
    dx: float,
) -> list[tuple[int, int, int, int, int]]:
    S, R, C = shape
    margin = max(1, round(1.5 / dx))
    min_voxels = max(1, round(3 * (0.5 / dx) ** 2))  # about 0.75 mm² of broken bone
    out = []
    for kk in range(mask.shape[0]):
        m2 = mask[kk]
        if int(m2.sum()) < min_voxels:
            continue
        rows = np.nonzero(m2.any(axis=1))[0] + box[1].start
        cols = np.nonzero(m2.any(axis=0))[0] + box[2].start
        k = kk + box[0].start
        r_lo, r_hi = int(rows[0]), int(rows[-1])
        c_lo, c_hi = int(cols[0]), int(cols[-1])
        if position != "HFS":
            k = S - 1 - k
            c_lo, c_hi = C - 1 - c_hi, C - 1 - c_lo
        r_lo, c_lo = max(0, r_lo - margin), max(0, c_lo - margin)
        r_hi, c_hi = min(R - 1, r_hi + margin), min(C - 1, c_hi + margin)
        out.append((c_lo, r_lo, c_hi - c_lo + 1, r_hi - r_lo + 1, int(inst[k])))
    out.sort(key=lambda b: b[4])
    return out


def _extra_series(study: SyntheticStudy, grid: _Grid) -> list[ExtraSeries]:
    """Soft-tissue-kernel reconstruction (thicker, smoother) and a lateral scout."""
    vol = study.volume
    hu = vol.hu
    m = max(2, round(2.0 / grid.dz))
    S = (hu.shape[0] // m) * m
    soft = hu[:S].astype(F32).reshape(S // m, m, *hu.shape[1:]).mean(axis=1)
    soft = ndimage.gaussian_filter(soft, sigma=(0, 1.0, 1.0), truncate=2.5)
    soft_aff = vol.affine.copy()
    soft_aff[:3, 0] = vol.affine[:3, 0] * m
    soft_aff[:3, 3] = vol.affine[:3, 3] + vol.affine[:3, 0] * (m - 1) / 2
    soft_series = ExtraSeries(
        name="soft_tissue",
        hu=np.rint(soft).astype(np.int16),
        affine=soft_aff,
        kernel="STANDARD",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slice_thickness=round(m * grid.dz, 3),
        description="C-SPINE SOFT TISSUE",
        series_uid=uid_for(study.seed, "series", 2),
        series_number=3,
    )
    # lateral scout: sum of attenuation along x, rows from head to feet, columns A -> P
    canon = hu if study.patient_position == "HFS" else hu[::-1, :, ::-1]
    mu = np.clip(canon.astype(F32) + 1000.0, 0, None).sum(axis=2) * F32(grid.dx / 1000.0)
    img = mu[::-1]  # top row = highest z
    img = np.clip(img / max(float(img.max()), 1e-3) * 3000.0 - 1000.0, -1024, 3071)
    aff = np.eye(4)
    aff[:3, 0] = (-1.0, 0, 0)
    aff[:3, 1] = (0, 0, -grid.dz)
    aff[:3, 2] = (0, grid.dx, 0)
    aff[:3, 3] = (float(grid.x.mean()), grid.y[0], grid.z[-1])
    scout = ExtraSeries(
        name="scout",
        hu=np.rint(img).astype(np.int16)[None],
        affine=aff,
        kernel="STANDARD",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        slice_thickness=1.0,
        description="SCOUT LATERAL",
        series_uid=uid_for(study.seed, "series", 0),
        series_number=1,
    )
    return [scout, soft_series]
