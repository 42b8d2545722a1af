"""Signed-distance parts and the bone renderer of generator v2 (mm, float32).

A bone is a smooth union of parts (capsules, ellipsoids, rounded boxes, a vertebral body
with concave endplates) minus holes (foramina), evaluated in the bone's local frame
(``u`` patient left, ``v`` posterior, ``w`` superior) only inside each part's bounding
box. The renderer turns the signed distance ``d`` (negative inside) into an anti-aliased
bone fraction (partial volume at the voxel scale), a cortical shell of a given thickness
and a textured trabecular interior.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

F32 = np.float32
Arr = np.ndarray
SdfFn = Callable[[Arr, Arr, Arr], Arr]


@dataclass
class Part:
    """One signed-distance part.

    Attributes
    ----------
    fn
        ``fn(u, v, w) -> d`` in local mm, negative inside.
    lo, hi
        Local bounding box of the part (where ``d`` can be <= the blend radius).
    blend
        Smooth-union radius in mm with what was added before (0: a plain union).
    """

    fn: SdfFn
    lo: np.ndarray
    hi: np.ndarray
    blend: float = 1.5


def smin(a: Arr, b: Arr, k: float) -> Arr:
    """Polynomial smooth minimum of two distances with blend radius ``k`` (mm)."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(F32(0.5) + F32(0.5 / k) * (b - a), 0, 1)
    return b + h * (a - b) - F32(k) * h * (1 - h)


def capsule(
    a: tuple[float, float, float],
    b: tuple[float, float, float],
    r0: float,
    r1: float | None = None,
    squash: tuple[float, float, float] = (1.0, 1.0, 1.0),
    blend: float = 1.5,
) -> Part:
    """A tapered capsule from ``a`` (radius ``r0``) to ``b`` (radius ``r1``).

    ``squash`` scales the cross-section per local axis (e.g. ``(1, 1, 2.5)`` makes a
    plate 2.5 times taller than wide).
    """
    r1 = r0 if r1 is None else r1
    sq = np.asarray(squash, float)
    A, B = np.asarray(a, float), np.asarray(b, float)
    an, bn = A / sq, B / sq
    ba = bn - an
    bb = float(ba @ ba) or 1e-6
    smin_sq = float(sq.min())
    rmax = max(r0, r1)

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        pu, pv, pw = u / F32(sq[0]) - F32(an[0]), v / F32(sq[1]) - F32(an[1]), w / F32(sq[2])
        pw = pw - F32(an[2])
        t = np.clip((pu * F32(ba[0]) + pv * F32(ba[1]) + pw * F32(ba[2])) / F32(bb), 0, 1)
        du, dv, dw = pu - t * F32(ba[0]), pv - t * F32(ba[1]), pw - t * F32(ba[2])
        dist = np.sqrt(du * du + dv * dv + dw * dw)
        return (dist - (F32(r0) + t * F32(r1 - r0))) * F32(smin_sq)

    ext = rmax * sq + blend
    return Part(fn, np.minimum(A, B) - ext, np.maximum(A, B) + ext, blend)


def ellipsoid(
    c: tuple[float, float, float], r: tuple[float, float, float], blend: float = 1.5
) -> Part:
    """An ellipsoid (approximate distance, exact on the axes)."""
    C, R = np.asarray(c, float), np.asarray(r, float)
    rmin = float(R.min())

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        q = ((u - F32(C[0])) / F32(R[0])) ** 2 + ((v - F32(C[1])) / F32(R[1])) ** 2
        q += ((w - F32(C[2])) / F32(R[2])) ** 2
        return (np.sqrt(q) - 1) * F32(rmin)

    return Part(fn, C - R - blend, C + R + blend, blend)


def rbox(
    c: tuple[float, float, float],
    half: tuple[float, float, float],
    radius: float = 1.0,
    shear: float = 0.0,
    blend: float = 1.5,
) -> Part:
    """A rounded box; ``shear`` tilts its top and bottom faces: ``w -= shear * (v - c_v)``.

    A sheared box is the articular pillar: its upper and lower faces are the superior and
    inferior facets, inclined ``atan(shear)`` to the axial plane and facing backwards.
    """
    C, H = np.asarray(c, float), np.asarray(half, float)
    cosf = 1.0 / float(np.hypot(1.0, shear))

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        dv_ = v - F32(C[1])
        qu = np.abs(u - F32(C[0])) - F32(H[0] - radius)
        qv = np.abs(dv_) - F32(H[1] - radius)
        qw = (np.abs(w - F32(C[2]) + F32(shear) * dv_) - F32(H[2] - radius)) * F32(cosf)
        out = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2 + np.maximum(qw, 0) ** 2)
        return out + np.minimum(np.maximum(np.maximum(qu, qv), qw), 0) - F32(radius)

    ext = H + np.array([0.0, 0.0, abs(shear) * H[1]]) + blend
    return Part(fn, C - ext, C + ext, blend)


def vertebral_body(
    a: float,
    b: float,
    h: float,
    *,
    power: float = 3.0,
    conc_top: float = 1.0,
    conc_bottom: float = 1.2,
    anterior_lip: float = 1.2,
    wedge: float = 0.0,
    centre_v: float = 0.0,
) -> Part:
    """A vertebral body: superelliptic cross-section with concave endplates.

    Parameters
    ----------
    a, b
        Half width (left-right) and half depth (antero-posterior) in mm.
    h
        Height at the centre of the endplates plus the concavities (rim height).
    power
        Superellipse exponent of the axial cross-section (2: ellipse, 3+: rounded
        rectangle, as the cervical bodies are).
    conc_top, conc_bottom
        Depth of the superior (coronal, between the uncinate processes) and inferior
        (sagittal) endplate concavities in mm.
    anterior_lip
        How far the antero-inferior rim projects downwards (the cervical "lip") in mm.
    wedge
        Anterior height loss of a compression in mm (the top descends linearly from the
        back to the front).
    centre_v
        ``v`` of the body centre.
    """
    bmin = min(a, b)

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        vu = v - F32(centre_v)
        q = (np.abs(u) / F32(a)) ** power + (np.abs(vu) / F32(b)) ** power
        r = q ** F32(1.0 / power)
        dxy = (r - 1) * F32(bmin)
        rr = np.minimum(r * r, 1)
        ux = np.minimum((u / F32(a)) ** 2, 1)
        vx = np.minimum((vu / F32(b)) ** 2, 1)
        top = F32(h / 2) - F32(conc_top) * (1 - ux) * (1 - 0.6 * vx)
        if wedge:
            top = top - F32(wedge) * np.clip((F32(b) - vu) / F32(2 * b), 0, 1)
        bot = -F32(h / 2) + F32(conc_bottom) * (1 - rr)
        if anterior_lip:
            bot = bot - F32(anterior_lip) * np.clip((-vu - F32(0.55 * b)) / F32(0.45 * b), 0, 1)
        dz = np.maximum(w - top, bot - w)
        outside = np.sqrt(np.maximum(dxy, 0) ** 2 + np.maximum(dz, 0) ** 2)
        return outside + np.minimum(np.maximum(dxy, dz), 0)

    pad = 1.5
    return Part(
        fn,
        np.array([-a - pad, centre_v - b - pad, -h / 2 - anterior_lip - pad]),
        np.array([a + pad, centre_v + b + pad, h / 2 + pad]),
        0.0,
    )


def cylinder_w(cu: float, cv: float, r: float, w0: float = -30.0, w1: float = 30.0) -> Part:
    """An infinite-ish cylinder along ``w`` (a foramen to subtract)."""

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        return np.sqrt((u - F32(cu)) ** 2 + (v - F32(cv)) ** 2) - F32(r)

    return Part(fn, np.array([cu - r - 1, cv - r - 1, w0]), np.array([cu + r + 1, cv + r + 1, w1]))


@dataclass
class Cut:
    """A fracture plane through a bone (local frame).

    Attributes
    ----------
    normal, offset
        Plane ``normal . p = offset`` (unit normal).
    gap
        Width of the fracture line in mm (sub-voxel gaps render as faint partial-volume
        lines: a non-displaced fracture).
    shift
        Displacement of the fragment on the positive side (local mm).
    centre, radius
        The cut acts inside this sphere only.
    rough
        Amplitude of the irregular fracture surface in mm.
    phase
        Three phases of the roughness.
    v_max
        The cut acts only where ``v < v_max`` (keeps a body break out of the arch).
    """

    normal: np.ndarray
    offset: float
    gap: float
    shift: np.ndarray
    centre: np.ndarray
    radius: float
    rough: float = 0.4
    phase: tuple[float, float, float] = (0.0, 0.0, 0.0)
    v_max: float = 1e9


@dataclass
class Bone:
    """A bone to render: parts in a local frame, material and fracture cuts.

    Attributes
    ----------
    name, code
        Name and label code (0: not labelled).
    centre, R
        Local origin in patient coordinates and the 3x3 matrix whose columns are the
        local ``u, v, w`` axes in patient coordinates.
    parts, holes
        Union parts and subtracted holes.
    cortex_mm, cortex_hu, trab_hu
        Cortical thickness and density, mean trabecular density.
    texture_gain
        Scale of the trabecular texture (0: none, e.g. teeth).
    marrow
        Amplitude of the slow marrow heterogeneity in HU.
    shade
        Optional ``shade(u, v, w) -> extra HU`` of the interior (sclerosis bands).
    warp
        Smooth deformation: 3x3x2 polynomial coefficients (mm per mm and mm per mm²).
    cuts
        Fracture planes.
    fracture_band
        ``(w_from, w_to, v_max)`` local band marked as fracture truth (compressions).
    """

    name: str
    code: int
    centre: np.ndarray
    R: np.ndarray
    parts: list[Part]
    holes: list[Part] = field(default_factory=list)
    cortex_mm: float = 1.2
    cortex_hu: float = 1200.0
    trab_hu: float = 260.0
    texture_gain: float = 1.0
    marrow: float = 40.0
    shade: SdfFn | None = None
    warp: np.ndarray | None = None
    cuts: list[Cut] = field(default_factory=list)
    fracture_band: tuple[float, float, float] | None = None
    marrow_phase: tuple[float, float, float] = (0.0, 1.0, 2.0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Local bounding box of all parts."""
        lo = np.min([p.lo for p in self.parts], axis=0)
        hi = np.max([p.hi for p in self.parts], axis=0)
        return lo, hi


@dataclass
class Canvas:
    """The canonical volume being painted (z, y, x ascending) and its grid."""

    hu: np.ndarray  # float32 [slice, row, column]
    lab: np.ndarray  # uint8, same shape
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    dx: float
    dz: float
    texture: np.ndarray  # float32 trabecular texture block, tiled by index

    @property
    def voxel(self) -> float:
        """Edge of a cube of the voxel's volume (anti-aliasing scale)."""
        return float((self.dx * self.dx * self.dz) ** (1 / 3))


def index_box(
    canvas: Canvas, centre: np.ndarray, R: np.ndarray, lo: np.ndarray, hi: np.ndarray, pad: float
) -> tuple[slice, slice, slice] | None:
    """Index box ``(z, y, x)`` of a local box after rotation, or None outside the grid."""
    corners = np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    pts = centre + corners @ R.T
    pmin, pmax = pts.min(axis=0) - pad, pts.max(axis=0) + pad
    out = []
    for axis_, coords in ((2, canvas.z), (1, canvas.y), (0, canvas.x)):
        a = int(np.searchsorted(coords, pmin[axis_], side="left"))
        b = int(np.searchsorted(coords, pmax[axis_], side="right"))
        if b <= a:
            return None
        out.append(slice(a, b))
    return out[0], out[1], out[2]


def _sub(outer: tuple[slice, ...], inner: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if inner is None:
        return None
    res = []
    for o, i in zip(outer, inner, strict=True):
        a, b = max(o.start, i.start), min(o.stop, i.stop)
        if b <= a:
            return None
        res.append(slice(a - o.start, b - o.start))
    return tuple(res)


def local_coords(
    canvas: Canvas, centre: np.ndarray, R: np.ndarray, box: tuple[slice, slice, slice]
) -> tuple[Arr, Arr, Arr]:
    """Local ``u, v, w`` (float32) of the voxels of ``box``."""
    ks, js, is_ = box
    X = (canvas.x[is_] - centre[0]).astype(F32)[None, None, :]
    Y = (canvas.y[js] - centre[1]).astype(F32)[None, :, None]
    Z = (canvas.z[ks] - centre[2]).astype(F32)[:, None, None]
    out = []
    for a in range(3):
        r = R[:, a].astype(F32)
        out.append((r[0] * X + r[1] * Y) + r[2] * Z)
    return out[0], out[1], out[2]


def render_bone(canvas: Canvas, bone: Bone) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """Paint ``bone`` into the canvas (blend over what is there) and label it.

    Returns
    -------
    (numpy.ndarray, tuple) or None
        The fracture-truth mask in the bone's index box (bone removed by the cuts or the
        compressed band) and the box, when the bone has cuts or a fracture band.
    """
    lo, hi = bone.bounds()
    h = canvas.voxel
    box = index_box(canvas, bone.centre, bone.R, lo, hi, 2 * h)
    if box is None:
        return None
    u, v, w = local_coords(canvas, bone.centre, bone.R, box)
    if bone.warp is not None:
        c = bone.warp.astype(F32)
        uu, vv, ww = u.copy(), v.copy(), w.copy()
        for a, arr in enumerate((u, v, w)):
            arr += c[a, 0, 0] * ww + c[a, 1, 0] * uu + c[a, 2, 0] * vv
            arr += c[a, 0, 1] * ww * ww * F32(0.01) + c[a, 1, 1] * uu * ww * F32(0.01)
            arr += c[a, 2, 1] * vv * ww * F32(0.01)
    gaps: list[tuple[Arr, Arr]] = []
    for cut in bone.cuts:
        n = cut.normal.astype(F32)
        sd = (u * n[0] + v * n[1]) + w * n[2] - F32(cut.offset)
        if cut.rough:
            ph = cut.phase
            sd += F32(cut.rough) * (
                np.sin(F32(0.9) * u + F32(ph[0])) * np.sin(F32(0.7) * w + F32(ph[1]))
                + F32(0.5) * np.sin(F32(1.7) * v + F32(ph[2]))
            )
        c0 = cut.centre.astype(F32)
        region = ((u - c0[0]) ** 2 + (v - c0[1]) ** 2 + (w - c0[2]) ** 2) < F32(cut.radius**2)
        if cut.v_max < 1e8:
            region &= v < F32(cut.v_max)
        frag = region & (sd > 0)
        s = cut.shift.astype(F32)
        if np.any(s):
            u = np.where(frag, u - s[0], u)
            v = np.where(frag, v - s[1], v)
            w = np.where(frag, w - s[2], w)
        gaps.append((region, sd))
    d = np.full(u.shape, 1e4, dtype=F32)
    for part in bone.parts:
        sub = _sub(box, index_box(canvas, bone.centre, bone.R, part.lo, part.hi, h))
        if sub is None:
            continue
        dv = d[sub]
        d[sub] = smin(dv, part.fn(u[sub], v[sub], w[sub]), part.blend)
    for hole in bone.holes:
        sub = _sub(box, index_box(canvas, bone.centre, bone.R, hole.lo, hole.hi, h))
        if sub is None:
            continue
        dv = d[sub]
        np.maximum(dv, -hole.fn(u[sub], v[sub], w[sub]), out=dv)
    intact = d <= 0
    broken = np.zeros(d.shape, bool) if (gaps or bone.fracture_band) else None
    for (region, sd), cut in zip(gaps, bone.cuts, strict=True):
        half = F32(cut.gap / 2)
        dg = np.where(region, np.maximum(d, half - np.abs(sd)), d)
        assert broken is not None
        broken |= intact & region & (np.abs(sd) <= max(half, F32(0.5 * h)))
        d = dg
    if bone.fracture_band is not None and broken is not None:
        w0, w1, vmax = bone.fracture_band
        broken |= (d <= 0) & (w > F32(w0)) & (w < F32(w1)) & (v < F32(vmax))
    frac = np.clip(F32(0.5) - d / F32(h), 0, 1)
    touched = frac > 0
    if not touched.any():
        return None
    t = F32(max(bone.cortex_mm, 0.35 * h))
    cw = np.clip((d[touched] + t) / F32(h) + F32(0.5), 0, 1)
    inner = np.full(cw.shape, F32(bone.trab_hu))
    if bone.texture_gain:
        tex = canvas.texture
        ks, js, is_ = box
        kk = np.arange(ks.start, ks.stop) % tex.shape[0]
        jj = np.arange(js.start, js.stop) % tex.shape[1]
        ii = np.arange(is_.start, is_.stop) % tex.shape[2]
        inner += F32(bone.texture_gain) * tex[np.ix_(kk, jj, ii)][touched]
    if bone.marrow:
        ph = bone.marrow_phase
        ut, vt, wt = u[touched], v[touched], w[touched]
        inner += (
            F32(bone.marrow)
            * (
                np.sin(F32(0.31) * ut + F32(ph[0])) * np.cos(F32(0.27) * vt + F32(ph[1]))
                + np.sin(F32(0.35) * wt + F32(ph[2]))
            )
            * F32(0.5)
        )
    if bone.shade is not None:
        inner += bone.shade(u[touched], v[touched], w[touched]).astype(F32)
    value = inner + cw * (F32(bone.cortex_hu) - inner)
    hub = canvas.hu[box]
    f = frac[touched]
    cur = hub[touched]
    hub[touched] = cur + f * (value - cur)
    if bone.code:
        labb = canvas.lab[box]
        labb[(d <= 0) & (labb == 0)] = bone.code
    if broken is None:
        return None
    return broken, box
