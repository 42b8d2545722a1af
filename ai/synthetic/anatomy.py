"""Vertebra templates: each vertebra as a union of signed-distance primitives (local mm).

All dimensions are adult averages scaled by the study's size factor. Local frame: ``u``
to the patient's left, ``v`` posterior, ``w`` superior; the body centre is the origin
(C1: the dens axis at the height of the ring).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from ai.synthetic.shapes import Capsule, EllCyl, Ellipsoid, Prim, Slab

ORDER: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3", "T4")
CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(ORDER)}

BODY_HEIGHT: dict[str, float] = {
    "C2": 15.5, "C3": 13.0, "C4": 13.0, "C5": 13.2, "C6": 13.6, "C7": 14.6,
    "T1": 16.0, "T2": 17.0, "T3": 18.0, "T4": 18.5,
}  # fmt: skip
"""Vertebral body heights in mm (C2: body only, without the dens)."""

DISC_HEIGHT: dict[str, float] = {
    "C2": 5.0, "C3": 5.2, "C4": 5.5, "C5": 5.5, "C6": 5.5, "C7": 5.0,
    "T1": 4.0, "T2": 4.0, "T3": 4.2,
}  # fmt: skip
"""Height of the disc below each vertebra in mm."""


@dataclass
class Template:
    """Primitives of one vertebra in its local frame.

    Attributes
    ----------
    prims
        ``(part, primitive)``; ``part`` is ``"body"``, ``"dens"``, ``"arch"``, ``"process"``.
    holes
        Primitives subtracted after the union (foramina).
    body
        The body primitive (None for C1), used for discs and compressions.
    body_back
        ``v`` of the posterior body wall (the arch starts behind it).
    arch_points
        Candidate points for arch breaks with the local break direction
        ``(point, direction)``.
    """

    prims: list[tuple[str, Prim]] = field(default_factory=list)
    holes: list[Prim] = field(default_factory=list)
    body: EllCyl | None = None
    body_back: float = 0.0
    arch_points: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Local bounding box of the union."""
        lo = np.min([p.lo for _, p in self.prims], axis=0)
        hi = np.max([p.hi for _, p in self.prims], axis=0)
        return lo, hi


def subaxial(
    name: str, s: float, h: float, wedge: float = 0.0, aspect: tuple[float, float] = (1.0, 1.0)
) -> Template:
    """C3..C7 (``name``), scale ``s``, body height ``h`` (mm), anterior height loss ``wedge``."""
    t = (int(name[1]) - 3) / 4.0
    a, b = (8.0 + 1.6 * t) * s * aspect[0], (7.4 + 0.6 * t) * s * aspect[1]
    hh = h / 2
    tp = Template()
    body = EllCyl(0.0, 0.0, a, b, -hh, hh, concave=0.6 * s, wedge=wedge, power=2.6)
    tp.body, tp.body_back = body, b
    tp.prims.append(("body", body))
    for sd in (1.0, -1.0):
        # uncinate processes: lips on the lateral edges of the upper endplate
        tp.prims.append(
            (
                "body",
                Capsule(
                    (sd * (a - 0.8 * s), -2 * s, hh - 0.8 * s),
                    (sd * (a - 0.8 * s), 3 * s, hh - 0.8 * s),
                    1.5 * s,
                ),
            )
        )
        # pedicles
        tp.prims.append(
            (
                "arch",
                Slab(
                    (sd * (a - 2.5 * s), b - 1.5 * s),
                    (sd * (a + 2.8 * s), b + 5.0 * s),
                    2.4 * s,
                    -hh + 3.5 * s,
                    hh - 3.0 * s,
                ),
            )
        )
        # articular pillars (lateral masses) with inclined facets
        tp.prims.append(
            (
                "arch",
                EllCyl(
                    sd * (a + 5.2 * s), b + 6.5 * s, 4.3 * s, 5.5 * s, -hh - 1.2 * s, hh + 0.2 * s
                ),
            )
        )
        # laminae, sloping down posteriorly
        tp.prims.append(
            (
                "arch",
                Slab(
                    (sd * (a + 4.0 * s), b + 9.5 * s),
                    (sd * 1.2 * s, b + 16 * s),
                    1.7 * s,
                    -hh - 0.5 * s,
                    hh - 3.5 * s,
                    tilt=0.25,
                ),
            )
        )
        # transverse process: anterior and posterior bars around the foramen transversarium
        reach = (11.0 + 3.0 * (name == "C7")) * s
        tp.prims.append(
            (
                "process",
                Slab(
                    (sd * (a - 1.0 * s), -3.8 * s),
                    (sd * (a + reach), -1.6 * s),
                    1.7 * s,
                    -2.8 * s,
                    2.2 * s,
                ),
            )
        )
        tp.prims.append(
            (
                "process",
                Slab(
                    (sd * (a + 1.0 * s), b - 1.0 * s),
                    (sd * (a + reach), 3.4 * s),
                    1.7 * s,
                    -2.8 * s,
                    2.2 * s,
                ),
            )
        )
        tp.prims.append(
            ("process", EllCyl(sd * (a + reach), 0.6 * s, 2.2 * s, 4.0 * s, -2.8 * s, 2.2 * s))
        )
        tp.arch_points.append(
            (np.array([sd * (a + 3.0 * s), b + 10.5 * s, 0.0]), np.array([-sd * 0.55, 0.85, 0.0]))
        )
    # spinous process: a sloping plate, bifid on C3..C6, long and single on C7
    v0 = b + 14.0 * s
    if name == "C7":
        length, slope = 27.0 * s, 0.42
        tp.prims.append(
            ("process", Slab((0.0, v0), (0.0, v0 + length), 2.5 * s, -5.0 * s, 3.0 * s, tilt=slope))
        )
        tip = (0.0, v0 + length, -1.0 * s - slope * length)
        tp.prims.append(("process", Ellipsoid(tip, (4.0 * s, 3.5 * s, 4.5 * s))))
    else:
        length, slope = (12.0 + 4.0 * t) * s, 0.4
        tp.prims.append(
            ("process", Slab((0.0, v0), (0.0, v0 + length), 2.4 * s, -4.5 * s, 2.5 * s, tilt=slope))
        )
        tip = (0.0, v0 + length, -1.0 * s - slope * length)
        for sd in (1.0, -1.0):
            end = (sd * 3.6 * s, tip[1] + 3.0 * s, tip[2] - 1.2 * s)
            tp.prims.append(("process", Capsule(tip, end, 2.0 * s)))
    return tp


def axis(s: float, h: float, aspect: tuple[float, float] = (1.0, 1.0)) -> Template:
    """C2 with its body (height ``h``) and the dens."""
    a, b, hh = 8.4 * s * aspect[0], 7.8 * s * aspect[1], h / 2
    tp = Template()
    body = EllCyl(0.0, 0.0, a, b, -hh, hh - 1.5 * s, concave=0.4 * s, power=2.3)
    tp.body, tp.body_back = body, b
    tp.prims.append(("body", body))
    tp.prims.append(("body", Ellipsoid((0.0, -1.0 * s, hh - 2.5 * s), (a * 0.8, b * 0.8, 3.5 * s))))
    tp.prims.append(
        ("dens", Capsule((0.0, -1.0 * s, hh - 1.0 * s), (0.0, -1.0 * s, hh + 9.0 * s), 4.9 * s))
    )
    tp.prims.append(
        ("dens", Ellipsoid((0.0, -1.0 * s, hh + 11.0 * s), (4.0 * s, 4.0 * s, 4.5 * s)))
    )
    for sd in (1.0, -1.0):
        # superior articular facets carrying C1
        tp.prims.append(
            (
                "arch",
                EllCyl(sd * (a + 2.5 * s), 1.5 * s, 6.0 * s, 7.0 * s, hh - 8.0 * s, hh + 0.4 * s),
            )
        )
        # pars / pedicles
        tp.prims.append(
            (
                "arch",
                Slab(
                    (sd * (a - 1.0 * s), b - 1.0 * s),
                    (sd * (a + 4.5 * s), b + 8.0 * s),
                    3.0 * s,
                    -4.5 * s,
                    hh - 2.0 * s,
                ),
            )
        )
        # inferior articular processes
        tp.prims.append(
            (
                "arch",
                EllCyl(
                    sd * (a + 5.0 * s), b + 6.0 * s, 4.2 * s, 5.0 * s, -hh - 1.2 * s, -hh + 6.0 * s
                ),
            )
        )
        # laminae
        tp.prims.append(
            (
                "arch",
                Slab(
                    (sd * (a + 4.5 * s), b + 9.0 * s),
                    (sd * 1.5 * s, b + 18.0 * s),
                    2.3 * s,
                    -hh + 1.5 * s,
                    2.5 * s,
                    tilt=0.12,
                ),
            )
        )
        # small transverse process with its foramen
        tp.prims.append(
            (
                "process",
                Slab(
                    (sd * (a + 1.0 * s), 2.0 * s),
                    (sd * (a + 9.0 * s), 3.0 * s),
                    3.4 * s,
                    -5.5 * s,
                    -0.5 * s,
                ),
            )
        )
        tp.holes.append(EllCyl(sd * (a + 4.0 * s), 2.2 * s, 2.4 * s, 2.4 * s, -12 * s, 6 * s))
        tp.arch_points.append(
            (
                np.array([sd * (a + 3.0 * s), b + 11.5 * s, -1.0 * s]),
                np.array([-sd * 0.5, 0.87, 0.0]),
            )
        )
    # large bifid spinous process
    v0, length, slope = b + 16.0 * s, 13.0 * s, 0.35
    tp.prims.append(
        ("process", Slab((0.0, v0), (0.0, v0 + length), 2.9 * s, -7.0 * s, 2.5 * s, tilt=slope))
    )
    tip = (0.0, v0 + length, -2.2 * s - slope * length)
    for sd in (1.0, -1.0):
        end = (sd * 4.5 * s, tip[1] + 4.0 * s, tip[2] - 1.5 * s)
        tp.prims.append(("process", Capsule(tip, end, 2.6 * s)))
    return tp


def atlas(s: float) -> Template:
    """C1: anterior arch, lateral masses, posterior arch, transverse processes; no body.

    Origin on the dens axis at the height of the ring.
    """
    tp = Template()
    ring = 2.0 * s
    # anterior arch (three segments) and its tubercle
    pts = [(-11.0, -3.5), (-5.0, -8.2), (5.0, -8.2), (11.0, -3.5)]
    for p0, p1 in itertools.pairwise(pts):
        tp.prims.append(
            ("arch", Slab((p0[0] * s, p0[1] * s), (p1[0] * s, p1[1] * s), ring, -4.5 * s, 4.5 * s))
        )
    tp.prims.append(("arch", Ellipsoid((0.0, -9.8 * s, 0.0), (4.5 * s, 2.6 * s, 5.2 * s))))
    for sd in (1.0, -1.0):
        # lateral masses
        tp.prims.append(
            (
                "arch",
                EllCyl(
                    sd * 13.0 * s, 1.5 * s, 6.0 * s, 8.5 * s, -6.5 * s, 5.5 * s, concave=1.2 * s
                ),
            )
        )
        # posterior arch
        tp.prims.append(
            (
                "arch",
                Slab(
                    (sd * 13.0 * s, 9.0 * s),
                    (sd * 10.0 * s, 21.0 * s),
                    ring * 1.1,
                    -3.2 * s,
                    3.2 * s,
                ),
            )
        )
        tp.prims.append(
            (
                "arch",
                Slab((sd * 10.0 * s, 21.0 * s), (0.0, 27.0 * s), ring * 1.1, -3.2 * s, 3.2 * s),
            )
        )
        # transverse processes with their foramina
        tp.prims.append(
            (
                "process",
                Slab(
                    (sd * 16.0 * s, 0.5 * s), (sd * 33.0 * s, 2.5 * s), 4.3 * s, -3.2 * s, 3.2 * s
                ),
            )
        )
        tp.holes.append(EllCyl(sd * 21.0 * s, 1.6 * s, 2.7 * s, 2.7 * s, -10 * s, 10 * s))
    tp.prims.append(("arch", Ellipsoid((0.0, 28.5 * s, 0.0), (5.0 * s, 3.0 * s, 4.5 * s))))
    tp.arch_points.append((np.array([0.0, -8.2 * s, 0.0]), np.array([1.0, 0.0, 0.0])))
    tp.arch_points.append((np.array([6.0 * s, 24.5 * s, 0.0]), np.array([-0.86, 0.5, 0.0])))
    tp.arch_points.append((np.array([-6.0 * s, 24.5 * s, 0.0]), np.array([0.86, 0.5, 0.0])))
    return tp


def thoracic(
    name: str, s: float, h: float, wedge: float = 0.0, aspect: tuple[float, float] = (1.0, 1.0)
) -> Template:
    """T1..T4: larger body, posterolateral transverse processes, long spinous process."""
    t = int(name[1]) - 1
    a, b, hh = (11.5 + 0.8 * t) * s * aspect[0], (9.0 + 0.8 * t) * s * aspect[1], h / 2
    tp = Template()
    body = EllCyl(0.0, 0.0, a, b, -hh, hh, concave=0.6 * s, wedge=wedge, power=2.6)
    tp.body, tp.body_back = body, b
    tp.prims.append(("body", body))
    for sd in (1.0, -1.0):
        tp.prims.append(
            (
                "arch",
                Slab(
                    (sd * (a - 3.5 * s), b - 1.5 * s),
                    (sd * (a + 0.5 * s), b + 6.0 * s),
                    3.2 * s,
                    -hh + 2.0 * s,
                    hh - 2.5 * s,
                ),
            )
        )
        tp.prims.append(
            (
                "arch",
                Slab(
                    (sd * (a + 0.5 * s), b + 8.0 * s),
                    (sd * 1.5 * s, b + 16.0 * s),
                    2.4 * s,
                    -hh + 0.5 * s,
                    hh - 3.5 * s,
                    tilt=0.2,
                ),
            )
        )
        tp.prims.append(
            (
                "arch",
                EllCyl(
                    sd * (a + 1.5 * s), b + 7.0 * s, 3.8 * s, 4.0 * s, -hh - 0.8 * s, hh - 1.0 * s
                ),
            )
        )
        tp.prims.append(
            (
                "process",
                Slab(
                    (sd * (a + 1.0 * s), b + 5.0 * s),
                    (sd * (a + 17.0 * s), b + 10.0 * s),
                    3.6 * s,
                    -4.0 * s,
                    3.5 * s,
                ),
            )
        )
        tp.arch_points.append(
            (np.array([sd * (a - 1.0 * s), b + 11.0 * s, 0.0]), np.array([-sd * 0.55, 0.85, 0.0]))
        )
    v0, length, slope = b + 14.0 * s, 22.0 * s, 0.6
    tp.prims.append(
        ("process", Slab((0.0, v0), (0.0, v0 + length), 2.6 * s, -6.0 * s, 3.0 * s, tilt=slope))
    )
    tip = (0.0, v0 + length, -1.5 * s - slope * length)
    tp.prims.append(("process", Ellipsoid(tip, (4.0 * s, 3.5 * s, 4.5 * s))))
    return tp


def template(
    name: str, s: float, h: float, wedge: float = 0.0, aspect: tuple[float, float] = (1.0, 1.0)
) -> Template:
    """Template of vertebra ``name`` at scale ``s`` with body height ``h``.

    ``aspect`` scales the body's width and depth (per-vertebra shape variation);
    ``wedge`` is the anterior height loss of a compression fracture in mm.
    """
    if name == "C1":
        return atlas(s)
    if name == "C2":
        return axis(s, h, aspect)
    if name.startswith("C"):
        return subaxial(name, s, h, wedge, aspect)
    return thoracic(name, s, h, wedge, aspect)
