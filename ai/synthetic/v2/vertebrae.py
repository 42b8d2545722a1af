"""Vertebrae of generator v2, built from anatomical parts with level-specific dimensions.

Dimensions (mm, adult means, rounded) come from published morphometry:

* C3-C7: Panjabi MM, Duranceau J, Goel V, Oxland T, Takata K. "Cervical human
  vertebrae: quantitative three-dimensional anatomy of the middle and lower regions".
  Spine 1991;16(8):861-869 (endplate width and depth, body height, canal width and
  depth, pedicle width, height and inclination, facet inclination, spinous process
  length); Gilad I, Nissan M. "Sagittal evaluation of elemental geometrical dimensions
  of human vertebrae". J Anat 1985;143:115-120, and "A study of vertebra and disc
  geometric relations of the human cervical and lumbar spine". Spine 1986;11(2):154-157
  (body and disc heights).
* C1 and C2: Doherty BJ, Heggeness MH. "The quantitative anatomy of the atlas". Spine
  1994;19(22):2497-2500, and "Quantitative anatomy of the second cervical vertebra".
  Spine 1995;20(5):513-517 (ring diameters, lateral masses, dens height and width).
* T1-T12 and L1-L5 (out-of-scope fields): Panjabi MM et al. "Thoracic human vertebrae".
  Spine 1991;16(8):888-901, and "Human lumbar vertebrae". Spine 1992;17(3):299-306.

Local frame of each vertebra: ``u`` patient left, ``v`` posterior, ``w`` superior, origin
at the body centre (C1: on the dens axis at the height of the ring).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ai.synthetic.v2.sdf import (
    Bone,
    Part,
    capsule,
    cylinder_w,
    ellipsoid,
    rbox,
    vertebral_body,
)

CERVICAL: dict[str, dict[str, float]] = {
    # W, D: upper endplate width and depth; H: body height; CW, CD: canal width and depth;
    # PW, PH: pedicle width and height; PI: pedicle inclination to the midline (deg);
    # FI: facet inclination to the axial plane (deg); SPL: spinous length; SPA: spinous
    # angle below the horizontal (deg); TPW: span of the transverse processes.
    "C3": dict(
        W=15.5,
        D=15.2,
        H=13.0,
        CW=22.5,
        CD=14.5,
        PW=5.3,
        PH=7.3,
        PI=45,
        FI=45,
        SPL=18,
        SPA=30,
        TPW=50,
    ),
    "C4": dict(
        W=16.5,
        D=15.4,
        H=12.8,
        CW=23.5,
        CD=14.0,
        PW=5.5,
        PH=7.2,
        PI=47,
        FI=45,
        SPL=18,
        SPA=28,
        TPW=52,
    ),
    "C5": dict(
        W=17.3,
        D=15.7,
        H=12.6,
        CW=24.5,
        CD=14.0,
        PW=5.6,
        PH=7.1,
        PI=46,
        FI=47,
        SPL=20,
        SPA=25,
        TPW=55,
    ),
    "C6": dict(
        W=19.0,
        D=16.2,
        H=12.8,
        CW=24.5,
        CD=14.0,
        PW=5.8,
        PH=7.2,
        PI=42,
        FI=55,
        SPL=26,
        SPA=22,
        TPW=58,
    ),
    "C7": dict(
        W=21.0,
        D=16.4,
        H=14.0,
        CW=23.5,
        CD=14.5,
        PW=6.4,
        PH=7.4,
        PI=35,
        FI=62,
        SPL=36,
        SPA=18,
        TPW=66,
    ),
}
"""Typical cervical levels (Panjabi et al. 1991; Gilad & Nissan 1986), rounded means."""

C2_DIMS = dict(
    W=17.0,
    D=15.5,
    H=18.0,
    DENS_H=15.0,
    DENS_W=9.5,
    DENS_D=10.5,
    FACET_W=15.0,
    CW=24.0,
    CD=16.0,
    SPL=28,
    SPA=20,
)
"""C2 (Doherty & Heggeness 1995): body without the dens, dens height above the body."""

C1_DIMS = dict(
    AP=46.0, WIDTH=78.0, CANAL_AP=30.0, LM_W=15.0, LM_D=19.0, LM_H=14.0, ANT_H=10.0, POST_H=8.0
)
"""C1 (Doherty & Heggeness 1994): outer diameters, canal, lateral masses, arches."""

DISC_BELOW: dict[str, float] = {
    "C2": 4.5,
    "C3": 5.0,
    "C4": 5.3,
    "C5": 5.5,
    "C6": 5.3,
    "C7": 5.0,
}
"""Disc height below each cervical level (Gilad & Nissan 1986), mm."""

THORACIC = [f"T{i}" for i in range(1, 13)]
LUMBAR = [f"L{i}" for i in range(1, 6)]
ORDER: tuple[str, ...] = ("C1", "C2", *CERVICAL, *THORACIC, *LUMBAR)
CODES: dict[str, int] = {n: i + 1 for i, n in enumerate(ORDER)}
"""RSNA codes: 1..7 = C1..C7, 8..19 = T1..T12, 20..24 = L1..L5."""


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def level_dims(name: str) -> dict[str, float]:
    """Dimensions of a subaxial level (C3..L5); thoracic and lumbar are interpolated."""
    if name in CERVICAL:
        return dict(CERVICAL[name])
    if name.startswith("T"):
        t = (int(name[1:]) - 1) / 11
        return dict(
            W=_lerp(24, 40, t),
            D=_lerp(16, 31, t),
            H=_lerp(15, 23, t),
            CW=_lerp(20, 21, t) - 4 * math.sin(math.pi * t),
            CD=_lerp(15, 17, t),
            PW=_lerp(8, 8, t) - 3.5 * math.sin(math.pi * t),
            PH=_lerp(9, 15, t),
            PI=_lerp(30, 5, t),
            FI=_lerp(65, 80, t),
            SPL=_lerp(35, 32, t),
            SPA=_lerp(35, 30, t) + 25 * math.sin(math.pi * t),
            TPW=_lerp(72, 50, t),
        )
    t = (int(name[1:]) - 1) / 4
    return dict(
        W=_lerp(42, 50, t),
        D=_lerp(33, 36, t),
        H=_lerp(25, 27, t),
        CW=_lerp(22, 26, t),
        CD=_lerp(18, 17, t),
        PW=_lerp(8, 13, t),
        PH=_lerp(15, 14, t),
        PI=_lerp(10, 25, t),
        FI=85,
        SPL=30,
        SPA=5,
        TPW=_lerp(70, 90, t) if t < 0.9 else 85,
    )


def disc_below(name: str) -> float:
    """Nominal disc height below a level (mm)."""
    if name in DISC_BELOW:
        return DISC_BELOW[name]
    if name.startswith("T"):
        return _lerp(4.0, 7.0, (int(name[1:]) - 1) / 11)
    return 10.0


@dataclass
class VertebraInfo:
    """What the rest of the generator needs to know about a built vertebra.

    Attributes
    ----------
    bone
        The renderable :class:`ai.synthetic.v2.sdf.Bone`.
    canal_v, canal_half
        Canal centre (local ``v``) and half width/depth (mm).
    body
        ``(a, b, h)`` half width, half depth and height of the body (0 for C1).
    arch_points
        ``(point, normal)`` candidate arch-break planes (local).
    tp_tip
        Local position of the left transverse process tip (ribs attach near it).
    """

    bone: Bone
    canal_v: float
    canal_half: tuple[float, float]
    body: tuple[float, float, float]
    arch_points: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    tp_tip: np.ndarray = field(default_factory=lambda: np.zeros(3))


@dataclass
class Degeneration:
    """Degenerative change of one level (negatives that look like pathology).

    Attributes
    ----------
    osteophyte_mm
        Length of the anterior marginal osteophytes (0: none).
    sclerosis_hu
        Extra HU of the endplate sclerosis band (0: none).
    facet_hypertrophy
        Extra size of the articular pillars (facet arthrosis), mm.
    """

    osteophyte_mm: float = 0.0
    sclerosis_hu: float = 0.0
    facet_hypertrophy: float = 0.0


def _subaxial(
    name: str, s: float, dims: dict[str, float], deg: Degeneration, wedge: float
) -> VertebraInfo:
    """A typical vertebra (C3..L5): body, uncinates, pedicles, pillars, lamina, processes."""
    d = {k: v * (s if k not in ("PI", "FI", "SPA") else 1.0) for k, v in dims.items()}
    a, b, H = d["W"] / 2, d["D"] / 2, d["H"]
    cervical = name in CERVICAL
    parts: list[Part] = [
        vertebral_body(
            a,
            b,
            H,
            power=3.0 if cervical else 2.4,
            conc_top=1.2 if cervical else 0.8,
            conc_bottom=1.3,
            anterior_lip=1.3 if cervical else 0.3,
            wedge=wedge,
        )
    ]
    holes: list[Part] = []
    if cervical:  # uncinate processes: lips rising from the lateral superior rim
        for sd in (1.0, -1.0):
            parts.append(
                capsule(
                    (sd * (a - 1.3), -0.3 * b, H / 2 - 1.0),
                    (sd * (a - 1.0), 0.8 * b, H / 2 + 1.2),
                    1.7,
                    1.4,
                    blend=1.2,
                )
            )
    if deg.osteophyte_mm > 0:
        o = deg.osteophyte_mm
        for wz, sgn in ((H / 2, 1.0), (-H / 2, -1.0)):
            parts.append(capsule((-0.6 * a, -b + 0.5, wz), (0.6 * a, -b + 0.5, wz), 1.6, blend=1.5))
            parts.append(
                capsule(
                    (0.0, -b + 0.5, wz - sgn * 1.0),
                    (0.0, -b - 0.4 * o, wz + sgn * 0.8 * o),
                    1.8,
                    0.8,
                    blend=2.0,
                )
            )
    cw, cd = d["CW"] / 2, d["CD"]
    canal_v = b + cd / 2 + 0.5
    grow = deg.facet_hypertrophy
    fi = math.radians(dims["FI"])
    pu = cw + (3.5 if cervical else 2.5) + grow * 0.5
    pv = b + cd * (0.55 if cervical else 0.75)
    pillar_h = H / 2 + disc_below(name) / 2 - 0.9 + grow * 0.3
    pw, ph = d["PW"] / 2, d["PH"] / 2
    arch_points: list[tuple[np.ndarray, np.ndarray]] = []
    for sd in (1.0, -1.0):
        start = (sd * a * 0.62, b - 1.5, 0.5)
        end = (sd * (pu - 1.0), pv - 2.5, 0.5)
        parts.append(capsule(start, end, pw, squash=(1.0, 1.0, ph / pw), blend=1.8))
        parts.append(
            rbox(
                (sd * pu, pv, 0.0),
                (5.2 + grow * 0.5, 5.8 + grow * 0.5, pillar_h),
                2.0,
                shear=min(math.tan(fi), 1.8),
                blend=1.5,
            )
        )
        # lamina: from the pillar to the midline, a tall thin plate
        lam_end = (0.0, b + cd + 1.8, -2.0)
        parts.append(
            capsule(
                (sd * (pu - 2.5), pv + 3.5, -0.5), lam_end, 1.6, 1.9, squash=(1, 1, 2.4), blend=1.6
            )
        )
        arch_points.append((np.array(end), np.array([1.0, 0.35 * sd, 0.0]) * sd))
        arch_points.append(
            (
                np.array([sd * pu * 0.55, (pv + lam_end[1]) / 2 + 1.5, -1.0]),
                np.array([sd * 0.8, -0.6, 0.0]),
            )
        )
        # transverse process: anterior and posterior roots around the foramen
        tpx = d["TPW"] / 2
        if cervical:
            fv = b - 1.5
            fr = 2.8 * s if name != "C7" else 1.6 * s
            parts.append(
                rbox(
                    (sd * (a + tpx) / 2, fv - 0.3, -1.0),
                    ((tpx - a) / 2 + 1.0, 4.6, 2.8),
                    1.8,
                    blend=1.5,
                )
            )
            parts.append(
                ellipsoid(
                    (sd * (tpx - 1.5), fv - 3.5, -2.0), (2.6, 3.0, 3.4 if name != "C6" else 4.2)
                )
            )
            parts.append(ellipsoid((sd * (tpx - 0.5), fv + 3.0, -2.0), (2.4, 2.6, 3.0)))
            holes.append(cylinder_w(sd * (a + 4.2), fv, fr, -6.0, 6.0))
        else:  # thoracic/lumbar: a process pointing laterally (and backwards in the thorax)
            back = 6.0 if name.startswith("T") else 0.0
            parts.append(
                capsule(
                    (sd * (pu - 1), pv, 0.0),
                    (sd * tpx, pv + back, -1.0),
                    3.6,
                    3.0,
                    squash=(1, 1, 1.3),
                )
            )
    # spinous process
    spa = math.radians(dims["SPA"])
    sl = d["SPL"]
    root = np.array([0.0, b + cd + 1.5, -2.0])
    tip = root + np.array([0.0, sl * math.cos(spa), -sl * math.sin(spa)])
    r_root = 2.6 if cervical else 3.5
    parts.append(
        capsule(
            tuple(root),
            tuple(tip),
            r_root,
            2.0 if cervical else 3.0,
            squash=(1, 1, 1.6 if cervical else 2.6),
        )
    )
    if name in ("C3", "C4", "C5", "C6"):  # bifid tip
        for sd in (1.0, -1.0):
            parts.append(
                capsule(
                    tuple(tip - [0, 4.0, -1.2]),
                    tuple(tip + np.array([sd * 3.2, 1.5, -0.8])),
                    1.9,
                    1.7,
                    blend=1.2,
                )
            )
    else:
        parts.append(
            ellipsoid(
                tuple(tip + np.array([0, 1.0, -0.5])),
                (3.4, 3.0, 3.8) if cervical else (4.0, 4.0, 6.0),
            )
        )
    arch_points.append((root + (tip - root) * 0.35, np.array([0.0, 0.5, 1.0])))
    shade = _sclerosis(H, deg.sclerosis_hu, wedge)
    bone = Bone(name, CODES[name], np.zeros(3), np.eye(3), parts, holes, shade=shade)
    return VertebraInfo(
        bone,
        canal_v,
        (cw - 1.0, cd / 2 - 0.5),
        (a, b, H),
        arch_points,
        np.array([d["TPW"] / 2, b, -1.0]),
    )


def _sclerosis(H: float, hu: float, wedge: float):
    if hu <= 0 and wedge <= 0:
        return None
    comp = 350.0 if wedge > 0 else 0.0
    top = H / 2 - wedge

    def shade(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        near_top = np.clip(1 - (H / 2 - w) / 3.0, 0, 1)
        near_bot = np.clip(1 - (w + H / 2) / 3.0, 0, 1)
        out = np.float32(hu) * (near_top + near_bot)
        if comp:  # impaction band of a compression: dense trabeculae under the endplate
            out = out + np.float32(comp) * np.clip(1 - np.abs(w - (top - 3.0)) / 2.5, 0, 1)
        return out.astype(np.float32)

    return shade


def _c2(s: float, deg: Degeneration) -> VertebraInfo:
    d = {k: v * s if k not in ("SPA",) else v for k, v in C2_DIMS.items()}
    a, b, H = d["W"] / 2, d["D"] / 2, d["H"]
    parts: list[Part] = [
        vertebral_body(a, b, H, power=2.6, conc_top=0.0, conc_bottom=1.3, anterior_lip=2.5)
    ]
    top = H / 2
    # dens: a tapered post with a waist, its tip rounded
    parts.append(
        capsule(
            (0.0, -1.0, top - 4.0),
            (0.0, -1.5, top + d["DENS_H"] - d["DENS_W"] / 2),
            d["DENS_W"] / 2 + 0.8,
            d["DENS_W"] / 2,
            squash=(1.0, d["DENS_D"] / d["DENS_W"], 1.0),
            blend=2.5,
        )
    )
    holes: list[Part] = []
    cw, cd = d["CW"] / 2, d["CD"]
    arch_points = []
    for sd in (1.0, -1.0):
        # superior articular surfaces (carry C1), lateral to the dens
        parts.append(
            ellipsoid((sd * (a - 0.5), 1.5, top - 2.0), (d["FACET_W"] / 2, 8.5, 4.0), blend=2.5)
        )
        # pars/pedicle to the inferior articular process, behind and below
        parts.append(
            capsule(
                (sd * (a - 2.0), b - 1.0, top - 4.0),
                (sd * (cw + 2.0), b + cd * 0.6, -H / 2 + 2.0),
                3.6,
                3.8,
                squash=(1, 1, 1.4),
                blend=2.0,
            )
        )
        parts.append(
            rbox((sd * (cw + 2.5), b + cd * 0.6, -H / 2 + 1.0), (5.0, 6.0, 4.5), 2.0, shear=1.0)
        )
        # thick lamina
        parts.append(
            capsule(
                (sd * (cw + 1.0), b + cd * 0.75, -H / 2 + 3.0),
                (0.0, b + cd + 3.0, -H / 2 + 2.0),
                2.4,
                2.8,
                squash=(1, 1, 2.2),
            )
        )
        # small transverse process with its foramen
        parts.append(capsule((sd * (a + 2.0), 1.0, -1.0), (sd * (a + 10.0), 2.5, -3.0), 3.0, 2.2))
        holes.append(cylinder_w(sd * (a + 4.5), 2.0, 2.6 * s, -8.0, 4.0))
        arch_points.append(
            (np.array([sd * (cw - 1.0), b + cd * 0.45, -2.0]), np.array([sd, 0.3 * sd, 0.3]))
        )
    spa = math.radians(d["SPA"])
    root = np.array([0.0, b + cd + 3.0, -H / 2 + 2.0])
    tip = root + np.array([0.0, d["SPL"] * math.cos(spa), -d["SPL"] * math.sin(spa)])
    parts.append(capsule(tuple(root), tuple(tip), 4.0, 3.0, squash=(1, 1, 1.6)))
    for sd in (1.0, -1.0):  # the large bifid tip of C2
        parts.append(
            capsule(
                tuple(tip - [0, 6.0, 0]), tuple(tip + np.array([sd * 5.0, 2.0, -1.0])), 2.8, 2.4
            )
        )
    bone = Bone(
        "C2", 2, np.zeros(3), np.eye(3), parts, holes, shade=_sclerosis(H, deg.sclerosis_hu, 0.0)
    )
    return VertebraInfo(
        bone,
        b + cd / 2 + 1.0,
        (cw - 1.5, cd / 2 - 0.5),
        (a, b, H),
        arch_points,
        np.array([a + 10, 2.5, -3]),
    )


def _c1(s: float) -> VertebraInfo:
    d = {k: v * s for k, v in C1_DIMS.items()}
    parts: list[Part] = []
    holes: list[Part] = []
    lm_u = 12.0 * s + d["LM_W"] / 2 - 2.0
    ant_v = -(d["AP"] * 0.5 - 16.0 * s) - 10.0 * s  # front of the ring about 18 mm ahead
    # anterior arch with its tubercle
    sq_a = (1.0, 1.0, d["ANT_H"] / 6.0)
    pts_a = [(0.0, ant_v, 0.0), (7.0 * s, ant_v + 1.2 * s, 0.0), (lm_u - 4.0, -2.0 * s, 0.0)]
    for sd in (1.0, -1.0):
        for p0, p1 in itertools.pairwise(pts_a):
            parts.append(
                capsule(
                    (sd * p0[0], p0[1], 0.0), (sd * p1[0], p1[1], 0.0), 3.0, squash=sq_a, blend=1.5
                )
            )
    parts.append(ellipsoid((0.0, ant_v - 1.5, 0.0), (4.0, 3.0, d["ANT_H"] / 2 + 0.5)))
    # lateral masses
    for sd in (1.0, -1.0):
        parts.append(
            ellipsoid(
                (sd * lm_u, 3.0 * s, 0.0), (d["LM_W"] / 2, d["LM_D"] / 2, d["LM_H"] / 2), blend=2.0
            )
        )
    # posterior arch to the posterior tubercle
    post_v = ant_v + d["AP"] - 3.5
    sq_p = (1.0, 1.0, d["POST_H"] / 5.0)
    pts_p = [
        (lm_u - 1.0, 9.0 * s),
        (lm_u - 1.5, 17.0 * s),
        (9.0 * s, post_v - 4.0 * s),
        (0.0, post_v),
    ]
    for sd in (1.0, -1.0):
        for q0, q1 in itertools.pairwise(pts_p):
            parts.append(
                capsule(
                    (sd * q0[0], q0[1], 0.5), (sd * q1[0], q1[1], 0.5), 2.5, squash=sq_p, blend=1.5
                )
            )
    parts.append(ellipsoid((0.0, post_v, 0.0), (5.0, 3.5, d["POST_H"] / 2 + 0.8)))
    # transverse processes (the widest of the cervical spine) with their foramina
    for sd in (1.0, -1.0):
        parts.append(
            capsule(
                (sd * lm_u, 3.0 * s, 0.0),
                (sd * d["WIDTH"] / 2, 4.0 * s, -1.0),
                4.0,
                3.2,
                squash=(1, 1.2, 1),
            )
        )
        holes.append(cylinder_w(sd * (lm_u + 7.5 * s), 4.0 * s, 3.0 * s, -8.0, 8.0))
    arch_points = []
    for sd in (1.0, -1.0):
        arch_points.append((np.array([sd * 6.0 * s, ant_v + 1.0, 0.0]), np.array([sd, 0.3, 0.0])))
        arch_points.append(
            (np.array([sd * (lm_u - 1.5), 15.0 * s, 0.5]), np.array([0.1 * sd, 1.0, 0.0]))
        )
    bone = Bone("C1", 1, np.zeros(3), np.eye(3), parts, holes)
    canal_v = (ant_v + post_v) / 2 + 4.0 * s
    return VertebraInfo(
        bone,
        canal_v,
        (lm_u - d["LM_W"] / 2 - 1.0, d["CANAL_AP"] / 2 - 5.0),
        (0.0, 0.0, d["LM_H"]),
        arch_points,
        np.array([d["WIDTH"] / 2, 4.0, -1.0]),
    )


def build(
    name: str, scale: float, deg: Degeneration | None = None, wedge: float = 0.0
) -> VertebraInfo:
    """Build vertebra ``name`` (``C1`` .. ``L5``) at size ``scale`` (1 = published mean).

    Parameters
    ----------
    name
        Level.
    scale
        Size factor (the study's size times a small per-level jitter).
    deg
        Degenerative change (None: none).
    wedge
        Anterior height loss of a compression fracture in mm (C3 and below).
    """
    deg = deg or Degeneration()
    if name == "C1":
        return _c1(scale)
    if name == "C2":
        return _c2(scale, deg)
    return _subaxial(name, scale, level_dims(name), deg, wedge)


def body_height(name: str, scale: float) -> float:
    """Height of the body of a level at a size factor (C1: the lateral-mass height)."""
    if name == "C1":
        return C1_DIMS["LM_H"] * scale
    if name == "C2":
        return C2_DIMS["H"] * scale
    return level_dims(name)["H"] * scale
