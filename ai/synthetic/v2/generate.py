"""Generator v2: seeded neck-CT phantoms from anatomical parts (see :mod:`ai.synthetic.v2`).

Output is a :class:`SyntheticStudyV2`, a :class:`ai.synthetic.spec.SyntheticStudy` with the
same volume, label, fracture-box and UID conventions as generator v1, so every writer
(:func:`ai.synthetic.write_study`, :func:`ai.synthetic.write_rsna_dataset`) and reader
works unchanged. Label codes: 1..7 C1..C7, 8..19 T1..T12, 20..24 L1..L5 (RSNA numbering
extended to the lumbar spine), 40 skull, 41 mandible, 42 other bone (written as 0 in RSNA
segmentations).

Pipeline: spine layout (posture, size, degeneration) -> field of view and grid ->
fractures -> soft tissue slice by slice -> discs and bones as anti-aliased signed-distance
shapes with a cortical shell and textured marrow -> dental metal streaks -> point-spread
blur -> correlated noise -> stored orientation and truth.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ai.synthetic.generate import _boxes, _extra_series, _Grid, sop_uid_for, uid_for
from ai.synthetic.spec import FIELDS_OF_VIEW, Fracture, StudySpec, SyntheticStudy
from ai.synthetic.v2 import body as tissue
from ai.synthetic.v2 import imaging
from ai.synthetic.v2.sdf import F32, Bone, Canvas, Cut, render_bone, vertebral_body
from ai.synthetic.v2.vertebrae import (
    ORDER,
    Degeneration,
    VertebraInfo,
    build,
    disc_below,
)
from ai.types import VERTEBRAE, CTVolume

logger = logging.getLogger(__name__)

V2_FRACTURE_KINDS: tuple[str, ...] = (
    "body_break",
    "arch_break",
    "dens_break",
    "compression",
    "teardrop",
    "jefferson",
)
"""Fracture kinds of v2: v1's four plus ``teardrop`` (antero-inferior corner fragment,
C2..C7) and ``jefferson`` (two to four breaks of the C1 ring); ``dens_break`` is a type II
odontoid fracture (through the base of the dens)."""

BODY_FIELDS: tuple[str, ...] = ("neck", "head", "thorax", "lumbar", "abdomen")
"""Body regions of v2. Only ``neck`` contains C1..C7; the others are out-of-scope negatives."""

FRACTURE_WEIGHT = {"C1": 0.8, "C2": 1.9, "C3": 0.6, "C4": 0.7, "C5": 1.0, "C6": 1.3, "C7": 1.4}


@dataclass(frozen=True)
class V2Options:
    """Knobs of v2 that :class:`ai.synthetic.spec.StudySpec` has no field for.

    Attributes
    ----------
    body_field
        One of :data:`BODY_FIELDS`, or ``"random"`` (neck 80 %, the others 5 % each).
    fracture_kinds
        Kinds allowed (subset of :data:`V2_FRACTURE_KINDS`). v1 kinds are also filtered by
        ``StudySpec.fracture_kinds``; the v2-only kinds are not.
    subtle_rate
        Fraction of fractures that are subtle (hairline, not displaced).
    metal_rate, contrast_rate, soft_kernel_rate
        Rates of dental metal, contrast-enhanced vessels and a soft-tissue kernel.
    """

    body_field: str = "neck"
    fracture_kinds: tuple[str, ...] = V2_FRACTURE_KINDS
    subtle_rate: float = 0.4
    metal_rate: float = 0.15
    contrast_rate: float = 0.3
    soft_kernel_rate: float = 0.15

    def __post_init__(self) -> None:
        if self.body_field not in (*BODY_FIELDS, "random"):
            raise ValueError(f"body_field must be one of {(*BODY_FIELDS, 'random')}")
        bad = set(self.fracture_kinds) - set(V2_FRACTURE_KINDS)
        if bad or not self.fracture_kinds:
            raise ValueError(f"fracture_kinds must be a non-empty subset of {V2_FRACTURE_KINDS}")
        for name in ("subtle_rate", "metal_rate", "contrast_rate", "soft_kernel_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1")


@dataclass
class SyntheticStudyV2(SyntheticStudy):
    """A v2 study: :class:`ai.synthetic.spec.SyntheticStudy` plus v2 truth.

    Attributes
    ----------
    generator
        ``"v2"``.
    body_field
        The body region (:data:`BODY_FIELDS`).
    details
        Posture, age, osteopenia, degeneration per level, dose, kernel, metal and each
        fracture's kind, severity and displacement (written to the manifest).
    rsna_max_code
        Highest label code written to RSNA segmentations (24: L5).
    """

    generator: str = "v2"
    body_field: str = "neck"
    details: dict = field(default_factory=dict)
    rsna_max_code: int = 24

    @property
    def manifest_extra(self) -> dict:
        """Extra keys of this study's manifest entry."""
        return {"generator": self.generator, "body_field": self.body_field, **self.details}


def _rot(axis: int, a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    if axis == 1:
        R[i, j], R[j, i] = s, -s
    return R


def _frame(theta: float, phi: float, yaw: float) -> np.ndarray:
    """Local axes (columns u, v, w): sagittal angle ``theta`` (positive: the spine descends
    posteriorly), coronal tilt ``phi`` and axial rotation ``yaw``."""
    st, ct = math.sin(theta), math.cos(theta)
    sag = np.column_stack([(1.0, 0.0, 0.0), (0.0, ct, st), (0.0, -st, ct)])
    return _rot(2, yaw) @ _rot(1, phi) @ sag


@dataclass
class _Level:
    name: str
    info: VertebraInfo
    centre: np.ndarray
    R: np.ndarray
    scale: float
    deg: Degeneration


def _z_extent(lv: _Level) -> tuple[float, float]:
    lo, hi = lv.info.bone.bounds()
    lo = lo.copy()
    hi = hi.copy()
    lo[1] = max(lo[1], -40.0)  # the far tips of the processes do not count as coverage
    hi[1] = min(hi[1], 30.0)
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    zs = (lv.centre + corners @ lv.R.T)[:, 2]
    return float(zs.min()), float(zs.max())


def _layout(rng: np.random.Generator, sg: float, age: float) -> tuple[list[_Level], dict]:
    """Vertebra centres and frames from C1 to L5 with posture and degeneration."""
    posture = str(rng.choice(["lordosis", "straight", "kyphosis"], p=[0.65, 0.25, 0.10]))
    cerv = {
        "lordosis": rng.uniform(15, 40),
        "straight": rng.uniform(-4, 8),
        "kyphosis": rng.uniform(-22, -6),
    }[posture]
    thor, lumb = rng.uniform(20, 45), rng.uniform(30, 60)
    tilt_total = rng.uniform(-8, 8)
    rot_total = rng.uniform(-14, 14)
    theta = math.radians(-cerv / 2 + rng.uniform(-8, 8))
    phi = math.radians(rng.uniform(-3, 3))
    yaw = math.radians(rng.uniform(-4, 4))
    sev = (
        float(np.clip((age - 35) / 45, 0, 1) * rng.uniform(0.3, 1.0))
        if rng.uniform() < 0.6
        else 0.0
    )
    wlev = {"C3": 0.5, "C4": 0.7, "C5": 1.0, "C6": 1.0, "C7": 0.6}
    degs: dict[str, Degeneration] = {}
    disc_f: dict[str, float] = {}
    for n in ORDER:
        w = wlev.get(n, 0.15 if n == "C2" else 0.0)
        osteo = sev * w * rng.uniform(1.0, 5.0) if rng.uniform() < 1.2 * sev * w else 0.0
        degs[n] = Degeneration(osteo, sev * w * rng.uniform(0, 350), sev * w * rng.uniform(0, 2.0))
        disc_f[n] = 1.0 - 0.6 * sev * w * rng.uniform(0.2, 1.0)
    levels: list[_Level] = []
    p = np.zeros(3)
    prev: _Level | None = None
    for n in ORDER[1:]:
        sc = sg * rng.uniform(0.96, 1.04)
        info = build(n, sc, degs[n])
        if n.startswith("C"):
            d_theta, d_phi, d_yaw = (
                math.radians(cerv / 5),
                math.radians(tilt_total / 5),
                math.radians(rot_total * 0.5 / 5),
            )
        elif n.startswith("T"):
            d_theta, d_phi, d_yaw = -math.radians(thor / 12), 0.0, 0.0
        else:
            d_theta, d_phi, d_yaw = math.radians(lumb / 5), 0.0, 0.0
        if prev is not None:
            theta += d_theta
            phi += d_phi
            yaw += d_yaw
            R = _frame(theta, phi, yaw)
            gap = (
                prev.info.body[2] / 2
                + disc_below(prev.name) * sc * disc_f[prev.name]
                + info.body[2] / 2
            )
            p = prev.centre - (prev.R[:, 2] + R[:, 2]) / 2 * gap
        else:
            R = _frame(theta, phi, yaw)
        jit = _rot(2, math.radians(rng.uniform(-1.5, 1.5))) @ _rot(
            0, math.radians(rng.uniform(-2, 2))
        )
        lv = _Level(n, info, p.copy(), R @ jit, sc, degs[n])
        levels.append(lv)
        prev = lv
    c2 = levels[0]
    s1 = sg * rng.uniform(0.96, 1.04)
    R1 = _frame(
        theta=math.atan2(-c2.R[1, 2], c2.R[2, 2]) - math.radians(rng.uniform(0, 6)),
        phi=0.0,
        yaw=math.atan2(c2.R[1, 0], c2.R[0, 0]) + math.radians(rot_total * 0.5),
    )
    c1_centre = c2.centre + c2.R[:, 2] * (c2.info.body[2] / 2 + 8.0 * s1) - c2.R[:, 1] * 1.0
    levels.insert(0, _Level("C1", build("C1", s1), c1_centre, R1, s1, Degeneration()))
    for lv in levels:
        lv.info.bone.warp = rng.uniform(-1, 1, size=(3, 3, 2)) * np.array([0.03, 0.25])
    meta = {
        "posture": posture,
        "cervical_lordosis_deg": round(float(cerv), 1),
        "lateral_tilt_deg": round(float(tilt_total), 1),
        "axial_rotation_deg": round(float(rot_total), 1),
        "degeneration": round(sev, 3),
        "osteophytes": [n for n in VERTEBRAE if degs[n].osteophyte_mm > 0],
        "disc_height_factor": {n: round(disc_f[n], 3) for n in VERTEBRAE[1:]},
    }
    return levels, meta


def _kinds_for(name: str, allowed: list[str]) -> list[str]:
    table = {
        "C1": ["jefferson", "arch_break"],
        "C2": ["dens_break", "body_break", "arch_break", "teardrop"],
    }
    kinds = table.get(name, ["body_break", "arch_break", "compression", "teardrop"])
    return [k for k in kinds if k in allowed]


def _plan(
    rng: np.random.Generator, lv: _Level, kind: str, subtle: bool, dx: float
) -> tuple[list[Cut], dict]:
    """Fracture cuts in the vertebra's local frame, and the record of what was drawn."""
    a, b, H = lv.info.body
    s = lv.scale
    gap = float(rng.uniform(0.15, 0.45) if subtle else rng.uniform(0.8, 2.0) * max(1.0, dx / 0.7))
    disp = float(rng.uniform(0.0, 0.4) if subtle else rng.uniform(1.2, 4.0) * max(1.0, dx / 0.7))
    p3 = rng.uniform(0, 6.28, 3)
    ph = (float(p3[0]), float(p3[1]), float(p3[2]))
    cuts: list[Cut] = []

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x)

    if kind == "body_break":
        n = unit(np.array([*rng.normal(size=2), rng.uniform(-0.4, 0.4)]))
        pt = np.array([rng.uniform(-0.3, 0.3) * a, rng.uniform(-0.3, 0.3) * b, 0.0])
        t = unit(np.cross(n, [0, 0, 1.0]))
        cuts.append(
            Cut(
                n,
                float(n @ pt),
                gap,
                (0.8 * n + 0.6 * t) * disp,
                np.zeros(3),
                1.6 * max(a, b),
                0.35,
                ph,
                v_max=b + 0.8,
            )
        )
    elif kind == "teardrop":
        n = unit(np.array([0.0, -0.75, -0.66]))
        pt = np.array([0.0, -0.45 * b, -0.25 * H])
        cuts.append(
            Cut(
                n,
                float(n @ pt),
                gap,
                np.array([0.0, -0.7, -0.7]) * disp,
                np.array([0.0, -b, -H / 2]),
                1.3 * b,
                0.25,
                ph,
                v_max=0.0,
            )
        )
    elif kind == "dens_break":
        n = unit(np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.25), 1.0]))
        pt = np.array([0.0, -1.0 * s, H / 2 + 1.5 * s])
        shift = np.array([rng.uniform(-0.3, 0.3), rng.choice([-1.0, 1.0]), 0.15]) * disp
        cuts.append(
            Cut(
                n,
                float(n @ pt),
                gap,
                shift,
                np.array([0.0, -1.2 * s, H / 2 + 9.5 * s]),
                9.8 * s,
                0.2,
                ph,
            )
        )
    elif kind == "jefferson":
        pts = lv.info.arch_points  # anterior left/right, posterior left/right
        order = rng.permutation(len(pts))[: int(rng.integers(2, 5))]
        for i in order:
            pt, nrm = pts[int(i)]
            n = unit(nrm)
            lateral = np.array([np.sign(pt[0]) or 1.0, 0.0, 0.0])
            cuts.append(Cut(n, float(n @ pt), gap, lateral * disp * 0.8, pt, 7.0 * s, 0.3, ph))
    elif kind == "arch_break":
        pt, nrm = lv.info.arch_points[int(rng.integers(len(lv.info.arch_points)))]
        n = unit(nrm)
        shift = (n * 0.5 + np.array([0, 0, rng.choice([-1.0, 1.0])]) * 0.6) * disp
        cuts.append(Cut(n, float(n @ pt), gap, shift, pt, 7.0 * s, 0.3, ph))
    record: dict[str, Any] = {
        "severity": "subtle" if subtle else "obvious",
        "gap_mm": round(gap, 2),
        "displacement_mm": round(disp, 2),
        "breaks": len(cuts),
    }
    return cuts, record


def _texture(rng: np.random.Generator, dx: float, dz: float) -> np.ndarray:
    """Trabecular texture block (float32 HU offsets): band-passed noise, sharpened."""
    n = rng.standard_normal((24, 96, 96), dtype=F32)
    s1 = (0.45 / dz, 0.45 / dx, 0.45 / dx)
    s2 = (1.3 / dz, 1.3 / dx, 1.3 / dx)
    bp = ndimage.gaussian_filter(n, s1, mode="wrap") - ndimage.gaussian_filter(n, s2, mode="wrap")
    bp /= bp.std() + F32(1e-6)
    return (F32(95.0) * np.tanh(F32(1.4) * bp)).astype(F32)


def _disc_bone(upper: _Level, lower: _Level, hu_disc: float, vacuum: bool) -> Bone | None:
    if upper.info.body[0] == 0 or lower.info.body[0] == 0:
        return None
    au, bu, hu_ = upper.info.body
    al, bl, hl = lower.info.body
    bottom_u = upper.centre - upper.R[:, 2] * hu_ / 2
    top_l = lower.centre + lower.R[:, 2] * hl / 2
    centre = (bottom_u + top_l) / 2
    height = float(np.linalg.norm(bottom_u - top_l)) + 2.5
    R = (upper.R + lower.R) / 2
    U, _, Vt = np.linalg.svd(R)
    R = U @ Vt
    part = vertebral_body(
        (au + al) / 2 * 0.97,
        (bu + bl) / 2 * 0.97,
        height,
        power=2.6,
        conc_top=0,
        conc_bottom=0,
        anterior_lip=0,
    )
    nucleus = -500.0 if vacuum else hu_disc - 15
    return Bone(
        f"disc {upper.name}",
        0,
        centre,
        R,
        [part],
        cortex_mm=3.0,
        cortex_hu=hu_disc + 15,
        trab_hu=nucleus,
        texture_gain=0.0,
        marrow=0.0,
    )


HEAD_AND_NECK_RATE = 0.3
"""Fraction of ``full`` neck fields that run up to the skull vault (60-100 mm above the
foramen magnum) instead of stopping 15-35 mm above it."""


def generate_study_v2(
    seed: int, spec: StudySpec | None = None, options: V2Options | None = None
) -> SyntheticStudyV2:
    """Generate one v2 synthetic CT study with its truth.

    Parameters
    ----------
    seed
        Any non-negative integer; the same seed, spec and options give identical output.
    spec
        Grid, orientation, fracture and noise parameters (as for v1). ``noise_hu`` is the
        bone-kernel noise at standard dose (a low dose doubles it); ``field_of_view``
        chooses the neck coverage (``full``, ``no_skull``, ``c1_c5``).
    options
        v2 knobs (:class:`V2Options`): body field, fracture kinds, rates.

    Returns
    -------
    SyntheticStudyV2
        Volume, labels, fractures (kind per vertebra), UIDs and v2 details.
    """
    spec = spec or StudySpec()
    options = options or V2Options()
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    rng = np.random.default_rng([seed, 20242])
    sg = rng.uniform(0.88, 1.12)
    age = float(rng.uniform(18, 90))
    levels, meta = _layout(rng, sg, age)
    by = {lv.name: lv for lv in levels}
    osteopenia = bool(rng.uniform() < 0.08 + 0.4 * np.clip((age - 50) / 40, 0, 1))
    cortex_base = rng.uniform(1000, 1500) * (0.9 if osteopenia else 1.0)
    trab_base = rng.uniform(90, 170) if osteopenia else rng.uniform(190, 330)
    x_fc, y_fc = rng.uniform(-12, 12), rng.uniform(-40, 20)
    shift = (
        np.array([x_fc + rng.uniform(-8, 8), y_fc + rng.uniform(-14, 2), rng.uniform(-250, 250)])
        - by["C2"].centre
    )
    for lv in levels:
        lv.centre = lv.centre + shift
    c1 = by["C1"]
    z_fm = _z_extent(c1)[1] + 4.0 * sg

    # ------------------------------------------------------------ field of view and grid
    fields = ("neck", "head", "thorax", "lumbar", "abdomen")
    body_field = str(rng.choice(fields, p=[0.8, 0.05, 0.05, 0.05, 0.05]))
    if options.body_field != "random":
        body_field = options.body_field
    neck_mode = str(rng.choice(FIELDS_OF_VIEW, p=[0.6, 0.25, 0.15]))
    if spec.field_of_view != "random":
        neck_mode = spec.field_of_view
    u = rng.uniform(size=4)
    if body_field == "neck":
        # a third of the full fields reach the vault, as head-and-neck planning CTs do
        full_top = z_fm + 15 + 20 * u[0] if u[2] >= HEAD_AND_NECK_RATE else z_fm + 60 + 40 * u[3]
        top = {
            "full": full_top,
            "no_skull": min(_z_extent(c1)[1] + 0.5 + 2.5 * u[0], z_fm - 1.0),
            "c1_c5": z_fm + 5 + 20 * u[0],
        }[neck_mode]
        t2, t1, c6, c5 = (by[n].centre[2] for n in ("T2", "T1", "C6", "C5"))
        bot = {"c1_c5": c6 + (c5 - 5 - c6) * u[1]}.get(neck_mode, t2 - 6 + (t1 - t2 + 6) * u[1])
    elif body_field == "head":
        bot = max(_z_extent(c1)[1], _z_extent(by["C2"])[1]) + 3 + 5 * u[0]
        top = bot + 100 + 50 * u[1]
    elif body_field == "thorax":
        top = _z_extent(by["C7"])[0] - 2 - 4 * u[0]
        bot = by["T12"].centre[2] - 20 * u[1]
    elif body_field == "lumbar":
        top = by["T12"].centre[2] + 10 * u[0]
        bot = _z_extent(by["L5"])[0] - 5 - 20 * u[1]
    else:
        top = by["T10"].centre[2]
        bot = _z_extent(by["L5"])[0] - 20 - 20 * u[1]
    if body_field != "neck":
        neck_mode = body_field
    lo_sp, hi_sp = spec.slice_spacing
    if spec.n_slices is None:
        dz = rng.uniform(lo_sp, hi_sp)
        n_slices = math.floor((top - bot) / dz) + 1
    else:
        n_slices = spec.n_slices
        dz = float(np.clip((top - bot) / (n_slices - 1), lo_sp, hi_sp))
        rng.uniform()
        if neck_mode == "no_skull" or body_field in ("thorax", "lumbar", "head"):
            keep_top = body_field != "head"
            if keep_top:
                bot = top - dz * (n_slices - 1)
            else:
                top = bot + dz * (n_slices - 1)
        else:
            mid = (top + bot) / 2
            top = mid + dz * (n_slices - 1) / 2
    dz = round(dz, 4)
    fov = rng.uniform(*spec.fov_mm) * (
        1.0 if body_field == "neck" else 1.5 if body_field == "head" else 2.3
    )
    dx = round(fov / spec.cols, 5)
    thickness = round(
        float(np.clip(dz * rng.choice([1.0, 1.0, 1.25, 1.5]), lo_sp, max(hi_sp, dz))), 3
    )
    if body_field in ("thorax", "lumbar", "abdomen"):
        x_fc, y_fc = by["T6"].centre[0], by["T6"].centre[1] - 60.0
    elif body_field == "head":
        x_fc, y_fc = c1.centre[0], c1.centre[1] - 25.0
    x0 = round(x_fc - (spec.cols - 1) / 2 * dx, 3)
    y0 = round(y_fc - (spec.rows - 1) / 2 * dx, 3)
    z0 = round(top - dz * (n_slices - 1), 3)
    S, Rr, Cc = n_slices, spec.rows, spec.cols
    xs, ys, zs = x0 + dx * np.arange(Cc), y0 + dx * np.arange(Rr), z0 + dz * np.arange(S)
    canvas = Canvas(
        np.empty((S, Rr, Cc), F32),
        np.zeros((S, Rr, Cc), np.uint8),
        xs,
        ys,
        zs,
        dx,
        dz,
        _texture(rng, dx, dz),
    )

    # ------------------------------------------------------------ coverage and fractures
    coverage: dict[str, float] = {}
    for n in VERTEBRAE:
        a, b = _z_extent(by[n])
        coverage[n] = round(max(0.0, min(b, zs[-1]) - max(a, zs[0])) / (b - a), 3)
    if body_field != "neck":
        coverage = {n: 0.0 for n in VERTEBRAE}
    visible = {n: coverage[n] >= 0.5 for n in VERTEBRAE}
    frng = np.random.default_rng([seed, 20243])
    allowed = [
        k
        for k in options.fracture_kinds
        if k in spec.fracture_kinds or k in ("teardrop", "jefferson")
    ]
    candidates = [n for n in VERTEBRAE if coverage[n] >= 0.95 and _kinds_for(n, allowed)]
    chosen: list[str] = []
    if frng.uniform() < spec.fracture_rate and candidates:
        mean_w = np.mean(list(FRACTURE_WEIGHT.values()))
        draws = frng.uniform(size=len(VERTEBRAE))
        for i, n in enumerate(VERTEBRAE):
            if n in candidates and draws[i] < min(
                1.0, spec.vertebra_fracture_rate * FRACTURE_WEIGHT[n] / mean_w
            ):
                chosen.append(n)
        if not chosen:
            w = np.array([FRACTURE_WEIGHT[n] for n in candidates])
            chosen.append(str(frng.choice(candidates, p=w / w.sum())))
    fractures: list[Fracture] = []
    frac_records = []
    for n in chosen:
        lv = by[n]
        kind = str(frng.choice(_kinds_for(n, allowed)))
        subtle = bool(frng.uniform() < options.subtle_rate)
        if kind == "compression":
            loss = float(frng.uniform(0.12, 0.22) if subtle else frng.uniform(0.25, 0.5))
            H = lv.info.body[2]
            lv.info = build(n, lv.scale, lv.deg, wedge=loss * H)
            lv.info.bone.fracture_band = (
                H / 2 - loss * H - 4.0,
                H / 2 + 0.5,
                lv.info.body[1] + 0.5,
            )
            rec: dict[str, Any] = {
                "severity": "subtle" if subtle else "obvious",
                "height_loss": round(loss, 3),
            }
            fractures.append(Fracture(vertebra=n, kind=kind, height_loss=round(loss, 3)))
        else:
            cuts, rec = _plan(frng, lv, kind, subtle, dx)
            lv.info.bone.cuts = cuts
            fractures.append(
                Fracture(vertebra=n, kind=kind, displacement_mm=float(rec["displacement_mm"]))
            )
        frac_records.append({"vertebra": n, "kind": kind, **rec})

    # ------------------------------------------------------------ soft tissue
    zc = np.array([lv.centre[2] for lv in levels])[::-1]

    def interp(vals: list[float]) -> np.ndarray:
        return np.interp(zs, zc, np.array(vals)[::-1])

    canal = [lv.centre + lv.R[:, 1] * lv.info.canal_v for lv in levels]
    contrast = rng.uniform() < options.contrast_rate
    tissue_hu: dict[str, float] = {
        "fat": rng.uniform(-115, -85),
        "muscle": rng.uniform(40, 60),
        "csf": rng.uniform(4, 15),
        "cord": rng.uniform(30, 40),
        "brain": rng.uniform(30, 40),
        "vessel": rng.uniform(180, 320) if contrast else rng.uniform(35, 50),
        "thyroid": rng.uniform(80, 120),
        "lung": rng.uniform(-880, -820),
        "liver": rng.uniform(50, 65),
        "kidney": rng.uniform(30, 40) if not contrast else rng.uniform(120, 200),
        "cartilage": rng.uniform(90, 250),
    }
    plaque = (
        float(rng.uniform(500, 1100)) if rng.uniform() < 0.6 * meta["degeneration"] + 0.05 else 0.0
    )
    guide = tissue.SliceGuide(
        bx=interp([lv.centre[0] for lv in levels]),
        by=interp([lv.centre[1] for lv in levels]),
        cx=interp([p[0] for p in canal]),
        cy=interp([p[1] for p in canal]),
        ca=interp([lv.info.canal_half[0] for lv in levels]),
        cb=interp([lv.info.canal_half[1] for lv in levels]),
        bb=interp([max(lv.info.body[1], 7.0 * sg) for lv in levels]),
        z_fm=z_fm,
        z_c2=by["C2"].centre[2],
        z_c4=by["C4"].centre[2],
        z_c6=by["C6"].centre[2],
        z_t1=by["T1"].centre[2],
        z_t4=by["T4"].centre[2],
        z_t12=by["T12"].centre[2],
        hu=tissue_hu,
        sg=sg,
        fat_mm=rng.uniform(4, 12),
        neck_a=rng.uniform(54, 66) * sg,
        neck_b=rng.uniform(52, 62) * sg,
        plaque=plaque,
        x_mid=c1.centre[0],
        y_fm=c1.centre[1] + 6.0 * sg,
    )
    marbling = ndimage.gaussian_filter(
        rng.standard_normal((4, Rr, Cc), dtype=F32), (0, 1.5, 1.5)
    ) * F32(18.0)
    img = np.empty((Rr, Cc), F32)
    for k in range(S):
        tissue.paint_slice(img, canvas, k, guide, marbling)
        canvas.hu[k] = img

    # ------------------------------------------------------------ discs and bones
    hu_disc = rng.uniform(70, 100)
    for up, low in itertools.pairwise(levels):
        vac = meta["disc_height_factor"].get(up.name, 1.0) < 0.6 and rng.uniform() < 0.5
        disc = _disc_bone(up, low, hu_disc, vac)
        if disc is not None:
            render_bone(canvas, disc)
    masks: dict[str, tuple[np.ndarray, tuple[slice, slice, slice]]] = {}
    thin = 0.7 if osteopenia else 1.0
    for lv in levels:
        bone = lv.info.bone
        bone.centre, bone.R = lv.centre, lv.R
        bone.cortex_mm = float(rng.uniform(0.8, 1.6) * thin * lv.scale)
        bone.cortex_hu = float(np.clip(cortex_base + rng.uniform(-100, 100), 850, 1700))
        bone.trab_hu = float(np.clip(trab_base + rng.uniform(-30, 30), 70, 420))
        bone.marrow = float(rng.uniform(15, 60))
        m3 = rng.uniform(0, 6.28, 3)
        bone.marrow_phase = (float(m3[0]), float(m3[1]), float(m3[2]))
        if body_field != "neck" and lv.name in VERTEBRAE:
            bone.code = 0 if body_field == "head" else bone.code
        res = render_bone(canvas, bone)
        if res is not None and lv.name in chosen:
            masks[lv.name] = res
    if body_field == "head":  # nothing cervical may carry a label in a head field
        canvas.lab[(canvas.lab >= 1) & (canvas.lab <= 7)] = 0
    c3 = by["C3"].centre
    others = tissue.head_bones(guide, c3, sg, rng, cortex_base, trab_base)
    t_pos = {
        lv.name: lv.centre + lv.R @ np.array([0.0, lv.info.body[1], 0.0])
        for lv in levels
        if lv.name.startswith("T")
    }
    spans = {lv.name: float(2 * lv.info.tp_tip[0]) for lv in levels if lv.name.startswith("T")}
    others += tissue.girdle_bones(
        t_pos, spans, sg, cortex_base, trab_base, 12 if body_field != "neck" else 2
    )
    metal = rng.uniform() < options.metal_rate
    teeth = [b for b in others if b.name == "tooth"]
    metal_teeth = []
    if metal and teeth:
        for i in rng.choice(len(teeth), size=int(rng.integers(1, 4)), replace=False):
            teeth[int(i)].cortex_hu = teeth[int(i)].trab_hu = 3500.0
            metal_teeth.append(teeth[int(i)])
    for other in others:
        render_bone(canvas, other)
    streak = float(rng.uniform(300, 900))
    for tooth in metal_teeth:
        part = tooth.parts[0]
        cz = (part.lo[2] + part.hi[2]) / 2
        cxy = ((part.lo[0] + part.hi[0]) / 2, (part.lo[1] + part.hi[1]) / 2)
        for kz in np.nonzero(np.abs(zs - cz) < 4.0)[0]:
            imaging.metal_streaks(canvas.hu[int(kz)], xs, ys, [cxy], rng, streak)

    # ------------------------------------------------------------ imaging
    kernel = "soft" if rng.uniform() < options.soft_kernel_rate else "bone"
    dose = str(rng.choice(["low", "standard", "high"], p=[0.3, 0.5, 0.2]))
    if spec.blur:
        imaging.blur(canvas.hu, dx, dz, kernel, thickness)
    if spec.noise_hu > 0:
        base = (
            spec.noise_hu
            * {"low": 2.0, "standard": 1.3, "high": 0.8}[dose]
            * (0.3 if kernel == "soft" else 1.0)
        )
        base /= math.sqrt(max(thickness, 0.5))
        chest = np.clip((guide.z_c6 - zs) / 45.0, 0, 1)
        imaging.add_noise(canvas.hu, rng, base * (1 + 1.0 * chest), kernel)
    np.clip(canvas.hu, -1024, 3071, out=canvas.hu)

    # ------------------------------------------------------------ stored orientation, truth
    position = str(rng.choice(["HFS", "FFS"], p=[0.8, 0.2]))
    if spec.patient_position != "random":
        position = spec.patient_position
    order = str(rng.choice(["superior_first", "inferior_first"], p=[0.7, 0.3]))
    if spec.instance_order != "random":
        order = spec.instance_order
    affine = np.eye(4)
    if position == "HFS":
        hu_s = np.rint(canvas.hu).astype(np.int16)
        lab_s = canvas.lab
        affine[:3, 0], affine[:3, 1], affine[:3, 2] = (0, 0, dz), (0, dx, 0), (dx, 0, 0)
        affine[:3, 3] = (xs[0], ys[0], zs[0])
    else:
        hu_s = np.ascontiguousarray(np.rint(canvas.hu[::-1, :, ::-1]).astype(np.int16))
        lab_s = np.ascontiguousarray(canvas.lab[::-1, :, ::-1])
        affine[:3, 0], affine[:3, 1], affine[:3, 2] = (0, 0, -dz), (0, dx, 0), (-dx, 0, 0)
        affine[:3, 3] = (xs[-1], ys[0], zs[-1])
    zs_stored = affine[2, 3] + affine[2, 0] * np.arange(S)
    rank = np.argsort(np.argsort(-zs_stored if order == "superior_first" else zs_stored))
    inst = (rank + 1).astype(np.int32)
    for fr in fractures:
        if fr.vertebra not in masks:
            continue
        mask, box = masks[fr.vertebra]
        code = VERTEBRAE.index(fr.vertebra) + 1
        lab_box = canvas.lab[box]
        margin = max(1, round(1.5 / dx))
        for kk in range(mask.shape[0]):
            rows = np.nonzero(mask[kk].any(axis=1))[0]
            if rows.size == 0:
                continue
            cols = np.nonzero(mask[kk].any(axis=0))[0]
            r0, r1 = max(0, rows[0] - margin), rows[-1] + margin + 1
            c0, c1_ = max(0, cols[0] - margin), cols[-1] + margin + 1
            if (lab_box[kk, r0:r1, c0:c1_] == code).sum() < 2:
                mask[kk] = False
        fr.boxes = _boxes(mask, box, position, (S, Rr, Cc), inst, dx)
    fractures = [f for f in fractures if f.boxes]
    kept = {f.vertebra for f in fractures}
    frac_records = [r for r in frac_records if r["vertebra"] in kept]
    vf = {n: int(n in kept) for n in VERTEBRAE}
    series_uid = uid_for(seed, "v2", "series", 1)
    details = {
        **meta,
        "age": round(age, 1),
        "size": round(float(sg), 3),
        "osteopenia": osteopenia,
        "trabecular_hu": round(float(trab_base), 1),
        "kernel_family": kernel,
        "dose": dose,
        "contrast": bool(contrast),
        "dental_metal": len(metal_teeth),
        "carotid_plaque": plaque > 0,
        "fracture_details": frac_records,
    }
    study = SyntheticStudyV2(
        seed=seed,
        spec=spec,
        volume=CTVolume(
            hu=hu_s,
            affine=affine,
            source_sop_instance_uids=[sop_uid_for(seed, series_uid, int(i)) for i in inst],
        ),
        labels=lab_s,
        fractures=fractures,
        vertebra_fractured=vf,
        patient_overall=int(any(vf.values())),
        visible=visible,
        coverage=coverage,
        field_of_view=neck_mode,
        patient_position=position,
        instance_numbers=inst,
        slice_thickness=thickness,
        kernel=str(
            rng.choice(
                ["BONE", "B70s", "YC", "FC30"] if kernel == "bone" else ["STANDARD", "B30s", "FC08"]
            )
        ),
        study_uid=uid_for(seed, "v2", "study"),
        series_uid=series_uid,
        frame_of_reference_uid=uid_for(seed, "v2", "for"),
        patient_name=f"SYNTH^PHANTOMV2^{seed:04d}",
        patient_id=f"SYN2{seed:04d}",
        study_date=f"2024{1 + seed % 12:02d}{1 + seed % 28:02d}",
        body_field=body_field,
        details=details,
    )
    if spec.extra_series:
        study.extra_series = _extra_series(study, _Grid(x=xs, y=ys, z=zs, dx=dx, dz=dz))
    return study
