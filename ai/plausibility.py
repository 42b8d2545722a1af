"""Anatomical plausibility of a stage-1 label map, checked before any crop is classified.

Stage 1 labels whatever looks like a vertebra to it; on an abdomen it finds "C2, C5, C6,
C7" on lumbar vertebrae. :func:`check` holds the label map against cervical anatomy and
says, per vertebra and for the study, what cannot be right. A vertebra that fails is
removed from the label map (it is never sent as a SEG segment labelled with a cervical
level) and is "not assessed: segmentation implausible (which check, measured value)";
a study whose levels do not form a cervical spine at all is not processed.

Checks of the chain of levels (a failure rejects the whole study):

``consecutive_levels``
    The levels found form one run: a level between two found levels is missing.
``craniocaudal_order``
    Each level's centroid lies below the one above it (patient superior-inferior axis).
``centroid_spacing``
    Distance between the centroids of neighbouring levels.
``smooth_curve``
    Centroids on one smooth curve: the second difference of the left-right and
    anterior-posterior centroid positions of three consecutive levels.
``most_levels_implausible``
    Half or more of the levels found fail their own checks: the segmentation as a whole
    is not to be trusted for the rest either.

Checks of each vertebra (a failure removes that vertebra):

``vertebra_size``
    Volume of the mask, and its extents, for a vertebra not cut by the field of view.
``bone_density``
    Mean HU inside the mask (a vertebra's mask is bone, cortex and marrow).
``midline``
    Left-right distance of the centroid from the median of the levels found.
``spinal_canal``
    (C2-C7) On axial slices through the mask, the vertebra encloses a low-density canal (the
    vertebral foramen) behind its body, of at least a minimal area.

The ranges are deliberately wide: they reject what is not a cervical spine, not
variation. Their basis: the lower cervical vertebrae (C3-C7) as measured by Panjabi et
al., "Cervical human vertebrae: quantitative three-dimensional anatomy of the middle and
lower regions", Spine 16(8):861-869 (1991): vertebral bodies of roughly 11-15 mm height
and 15-20 mm width, spinal canals of roughly 13-15 mm depth and 21-25 mm width; with
intervertebral discs of a few millimetres that gives centroid steps of about 15-21 mm.
C1 and C2 (the atlas ring, the axis with its dens) get the widest ranges, since no
equally precise source was relied on for them. Lumbar vertebrae (centroid steps of
35-45 mm, widths of 70-90 mm across the transverse processes, volumes far above those
of a cervical vertebra) fall outside the ranges, as do stray specks and blobs in soft
tissue. The ranges were checked against the shipped stage-1 model on synthetic phantoms
(which they must pass) before any real CT was looked at with them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ai.types import VERTEBRAE, CTVolume, Finding

CANAL_LEVELS = VERTEBRAE[1:]
"""Levels whose canal is checked: the C1 ring is thin and often left open by stage 1."""
CANAL_SLICES = 40
"""Axial slices of a vertebra searched for its canal, at most."""
VISIBLE_MM3 = 500.0
"""A level with less than this in the label map counts as not found (stage-1 convention)."""


@dataclass(frozen=True)
class Limits:
    """Ranges the checks use (mm, mm3, HU); see the module docstring for the sources."""

    spacing_mm: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "C1-C2": (7.0, 38.0),
            "C2-C3": (9.0, 36.0),
            "C3-C4": (9.0, 32.0),
            "C4-C5": (9.0, 32.0),
            "C5-C6": (9.0, 32.0),
            "C6-C7": (9.0, 34.0),
        }
    )
    volume_mm3: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "C1": (2000.0, 30000.0),
            "C2": (3000.0, 35000.0),
            **{v: (2500.0, 30000.0) for v in VERTEBRAE[2:]},
        }
    )
    max_extent_mm: tuple[float, float, float] = (60.0, 95.0, 95.0)
    """Largest superior-inferior, anterior-posterior and left-right extents of one mask."""
    min_mean_hu: float = 150.0
    max_midline_mm: float = 20.0
    max_curve_mm: float = 15.0
    min_canal_mm2: float = 10.0
    max_canal_hu: float = 200.0


@dataclass(frozen=True)
class LevelStats:
    """What the checks measure of one visible level."""

    label: str
    volume_mm3: float
    centroid: np.ndarray
    """LPS millimetres."""
    extent_mm: tuple[float, float, float]
    """Superior-inferior, anterior-posterior, left-right."""
    mean_hu: float
    cut: bool
    """Whether the mask touches the edge of the field of view."""
    canal_mm2: float | None
    """Largest enclosed low-density area found on the axial slices searched (the search
    stops once one is large enough; ``None``: not measured)."""


@dataclass
class Plausibility:
    """The outcome of :func:`check`.

    Attributes
    ----------
    stats
        Measurements of each visible level.
    rejected
        ``{"C5": Finding}``: vertebrae removed from the label map, with the check failed.
    study
        A finding that rejects the whole study, or ``None``.
    """

    stats: dict[str, LevelStats]
    rejected: dict[str, Finding]
    study: Finding | None = None

    @property
    def findings(self) -> list[Finding]:
        """Every failed check, the study's first."""
        head = [self.study] if self.study is not None else []
        return head + list(self.rejected.values())


def _finding(check: str, message: str) -> Finding:
    return Finding("implausible", "stage1", check, message)


def _canal_area(
    mask: np.ndarray, hu: np.ndarray, pixel_mm2: float, max_hu: float, enough_mm2: float
) -> float:
    """Largest low-density area the mask encloses on its axial slices (mm2).

    The slices are tried from the middle of the mask's extent outwards (every one up to
    :data:`CANAL_SLICES`, evenly spaced ones beyond), and the search stops at the first
    canal of ``enough_mm2``: the answer is "is there a canal", not its exact size.
    """
    n = mask.shape[0]
    middle = (n - 1) / 2.0
    order = sorted(range(n), key=lambda k: abs(k - middle))
    stride = max(1, -(-len(order) // CANAL_SLICES))
    best = 0.0
    for k in order[::stride][:CANAL_SLICES]:
        plane = mask[k]
        if np.count_nonzero(plane) < 8:
            continue
        holes = ndimage.binary_fill_holes(plane) & ~plane
        if not holes.any():
            continue
        lab, _ = ndimage.label(holes)
        sizes = np.bincount(lab.ravel())[1:]
        big = int(np.argmax(sizes)) + 1
        if float(hu[k][lab == big].mean()) <= max_hu:
            best = max(best, float(sizes[big - 1]) * pixel_mm2)
            if best >= enough_mm2:
                break
    return best


def measure(
    vol: CTVolume, label_map: np.ndarray, limits: Limits | None = None
) -> dict[str, LevelStats]:
    """Per-level measurements of a label map on the volume's grid."""
    limits = limits or Limits()
    a = np.asarray(vol.affine, dtype=np.float64)
    voxel_mm3 = abs(float(np.linalg.det(a[:3, :3])))
    pixel_mm2 = float(np.linalg.norm(a[:3, 1]) * np.linalg.norm(a[:3, 2]))
    lm = np.asarray(label_map)
    shape = lm.shape
    boxes = ndimage.find_objects(lm, max_label=len(VERTEBRAE))
    out: dict[str, LevelStats] = {}
    for value, box in enumerate(boxes, start=1):
        if box is None:
            continue
        sub = lm[box] == value
        count = int(sub.sum())
        if count * voxel_mm3 < VISIBLE_MM3:
            continue
        idx = np.argwhere(sub).astype(np.float64) + [s.start for s in box]
        centroid = (a @ np.r_[idx.mean(axis=0), 1.0])[:3]
        pts = idx @ a[:3, :3].T  # patient offsets (translation irrelevant for extents)
        ext = pts.max(axis=0) - pts.min(axis=0)
        cut = any(s.start == 0 or s.stop == n for s, n in zip(box, shape, strict=True))
        hu = vol.hu[box]
        canal = _canal_area(sub, hu, pixel_mm2, limits.max_canal_hu, limits.min_canal_mm2)
        out[VERTEBRAE[value - 1]] = LevelStats(
            label=VERTEBRAE[value - 1],
            volume_mm3=count * voxel_mm3,
            centroid=centroid,
            extent_mm=(float(ext[2]), float(ext[1]), float(ext[0])),
            mean_hu=float(hu[sub].mean()),
            cut=cut,
            canal_mm2=canal,
        )
    return out


def check(vol: CTVolume, label_map: np.ndarray, limits: Limits | None = None) -> Plausibility:
    """Hold a stage-1 label map against cervical anatomy (see the module docstring)."""
    lim = limits or Limits()
    stats = measure(vol, label_map, lim)
    result = Plausibility(stats=stats, rejected={})
    found = [v for v in VERTEBRAE if v in stats]
    if not found:
        return result

    # each vertebra on its own
    for name in found:
        s = stats[name]
        lo, hi = lim.volume_mm3[name]
        if s.volume_mm3 > hi:
            result.rejected[name] = _finding(
                "vertebra_size", f"{name} volume {s.volume_mm3 / 1000:.1f} cm3 > {hi / 1000:g} cm3"
            )
            continue
        if not s.cut and s.volume_mm3 < lo:
            result.rejected[name] = _finding(
                "vertebra_size", f"{name} volume {s.volume_mm3 / 1000:.1f} cm3 < {lo / 1000:g} cm3"
            )
            continue
        over = [
            (what, e, m)
            for what, e, m in zip(
                ("superior-inferior", "anterior-posterior", "left-right"),
                s.extent_mm,
                lim.max_extent_mm,
                strict=True,
            )
            if e > m
        ]
        if over:
            what, e, m = over[0]
            result.rejected[name] = _finding(
                "vertebra_size", f"{name} {what} extent {e:.0f} mm > {m:g} mm"
            )
            continue
        if s.mean_hu < lim.min_mean_hu:
            result.rejected[name] = _finding(
                "bone_density", f"{name} mean {s.mean_hu:.0f} HU < {lim.min_mean_hu:g} HU"
            )
            continue
        if (
            name in CANAL_LEVELS
            and not s.cut
            and s.canal_mm2 is not None
            and s.canal_mm2 < lim.min_canal_mm2
        ):
            result.rejected[name] = _finding(
                "spinal_canal",
                f"{name} encloses no spinal canal (largest {s.canal_mm2:.0f} mm2 "
                f"< {lim.min_canal_mm2:g} mm2)",
            )
    kept = [v for v in found if v not in result.rejected]
    if len(kept) >= 3:
        median_x = float(np.median([stats[v].centroid[0] for v in kept]))
        for name in list(kept):
            off = abs(float(stats[name].centroid[0]) - median_x)
            if off > lim.max_midline_mm:
                result.rejected[name] = _finding(
                    "midline",
                    f"{name} centroid {off:.0f} mm from the spine's midline > "
                    f"{lim.max_midline_mm:g} mm",
                )
        kept = [v for v in kept if v not in result.rejected]
    if not kept:
        return result
    if len(found) >= 2 and 2 * len(result.rejected) >= len(found):
        result.study = _finding(
            "most_levels_implausible",
            f"{len(result.rejected)} of {len(found)} levels found fail their checks, e.g. "
            f"{next(iter(result.rejected.values())).message}",
        )
        return result

    # the chain of levels
    first, last = VERTEBRAE.index(kept[0]), VERTEBRAE.index(kept[-1])
    run = VERTEBRAE[first : last + 1]
    missing = [v for v in run if v not in stats]
    if missing:
        result.study = _finding(
            "consecutive_levels",
            f"{', '.join(missing)} not found between {kept[0]} and {kept[-1]}",
        )
        return result
    for upper, lower in itertools.pairwise(kept):
        if VERTEBRAE.index(lower) != VERTEBRAE.index(upper) + 1:
            continue  # a rejected vertebra between them: no spacing to check
        cu, cl = stats[upper].centroid, stats[lower].centroid
        if cl[2] >= cu[2]:
            result.study = _finding(
                "craniocaudal_order",
                f"{lower} centroid {cl[2] - cu[2]:.0f} mm above {upper}'s, not below it",
            )
            return result
        dist = float(np.linalg.norm(cu - cl))
        lo, hi = lim.spacing_mm[f"{upper}-{lower}"]
        if not lo <= dist <= hi:
            result.study = _finding(
                "centroid_spacing",
                f"{upper}-{lower} centroids {dist:.0f} mm apart, expected {lo:g}-{hi:g} mm",
            )
            return result
    for a_, b_, c_ in zip(kept, kept[1:], kept[2:], strict=False):
        if VERTEBRAE.index(c_) - VERTEBRAE.index(a_) != 2:
            continue
        p = [stats[v].centroid[:2] for v in (a_, b_, c_)]
        bend = float(np.linalg.norm(p[0] - 2 * p[1] + p[2]))
        if bend > lim.max_curve_mm:
            result.study = _finding(
                "smooth_curve",
                f"{a_}-{b_}-{c_} centroids bend {bend:.0f} mm off a smooth curve > "
                f"{lim.max_curve_mm:g} mm",
            )
            return result
    return result


def limits_from(config: Mapping[str, Any] | None) -> Limits:
    """:class:`Limits` with a site's values for the scalar ranges (unknown keys refused)."""
    if not config:
        return Limits()
    base = Limits()
    scalars = {
        "min_mean_hu",
        "max_midline_mm",
        "max_curve_mm",
        "min_canal_mm2",
        "max_canal_hu",
    }
    unknown = set(config) - scalars
    if unknown:
        raise ValueError(
            f"unknown plausibility limit(s) {sorted(unknown)}; known: {sorted(scalars)}"
        )
    values = {k: float(v) for k, v in config.items()}
    return Limits(
        spacing_mm=base.spacing_mm,
        volume_mm3=base.volume_mm3,
        max_extent_mm=base.max_extent_mm,
        **values,
    )
