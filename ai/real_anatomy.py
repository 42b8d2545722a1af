"""Stage 1 judged on real CT without vertebra labels: against the spinal-cord contour.

Real head-and-neck CTs (OpenKBP) have their spinal cord contoured but no vertebra
labels. A cervical vertebral body lies anterior of the cord, near its left-right
position, and the levels run in craniocaudal order. For each level the label map
holds, this module measures where its **body** lies relative to the cord at that level:

* the body is approximated by the anterior half of the level's voxels (those anterior
  of the level's own centroid), so the posterior elements around the cord do not pull
  the centroid back;
* ``anterior_mm``: how far the body centroid lies in front of the cord's centroid on
  the same axial slice; ``lateral_mm``: the left-right distance between them.

A study **passes** when at least ``min_levels`` (6) of C1..C7 are found, every found
level's body is ``5..45 mm`` anterior and within ``20 mm`` left-right of the cord, and
the found levels run cranial to caudal in order (C1 highest). A non-cervical CT
(abdomen, lumbar, head only) passes when no voxel is labelled C1..C7.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ai.types import VERTEBRAE, CTVolume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
TO_KJI = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
"""Voxel (k, j, i) of a ``CTVolume`` is voxel (i, j, k) of :func:`lps_grid`."""


def lps_grid(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI's data ``[x, y, z]`` (x towards patient left, y posterior, z superior) and
    its LPS affine (nibabel's closest canonical orientation, then RAS -> LPS)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj)
    affine = RAS_TO_LPS @ img.affine  # RAS+ axes are now -x, -y, +z in LPS
    flip = np.eye(4)
    for axis in (0, 1):  # flip i and j so that they run along +x and +y of LPS
        flip[axis, axis] = -1.0
        flip[axis, 3] = data.shape[axis] - 1
    data = data[::-1, ::-1, :]
    return np.ascontiguousarray(data), affine @ flip


def nifti_volume(path: Path) -> CTVolume:
    """A NIfTI CT (HU) as a :class:`CTVolume`: slices inferior to superior, rows anterior
    to posterior, columns right to left, as an axial DICOM series."""
    hu, affine = lps_grid(path)
    return CTVolume(
        hu=np.ascontiguousarray(np.transpose(hu, (2, 1, 0))).astype(np.int16),
        affine=affine @ TO_KJI,
    )


def nifti_mask(path: Path, value: int) -> np.ndarray:
    """Boolean mask of ``value`` in a NIfTI label map, on :func:`nifti_volume`'s grid."""
    labels, _ = lps_grid(path)
    return np.ascontiguousarray(np.transpose(labels == value, (2, 1, 0)))


@dataclass(frozen=True)
class Criteria:
    """What a study must show to pass (issue figures; recorded with the results)."""

    min_levels: int = 6
    anterior_mm: tuple[float, float] = (5.0, 45.0)
    max_lateral_mm: float = 20.0
    cord_reach_mm: float = 10.0
    """A level whose own slice has no cord is compared with the nearest cord slice
    within this distance (the contour may stop at the foramen magnum, C1's level)."""


def _nearest_cord_slice(cord: np.ndarray, k: int, affine: np.ndarray, crit: Criteria) -> int | None:
    slices = np.flatnonzero(cord.any(axis=(1, 2)))
    if slices.size == 0:
        return None
    best = int(slices[np.argmin(np.abs(slices - k))])
    step = float(np.linalg.norm(affine[:3, 0]))
    return best if abs(best - k) * step <= crit.cord_reach_mm else None


@dataclass
class LevelPosition:
    """Where one found level's body lies relative to the cord."""

    level: str
    z_mm: float
    anterior_mm: float | None
    lateral_mm: float | None
    ok: bool
    why: str = ""


@dataclass
class StudyAnatomy:
    """The measured levels of one study and its verdict."""

    case: str
    levels: list[LevelPosition] = field(default_factory=list)
    in_order: bool = True
    passed: bool = False
    note: str = ""

    @property
    def found(self) -> int:
        """How many of C1..C7 have voxels."""
        return len(self.levels)


def measure(
    case: str,
    label_map: np.ndarray,
    cord: np.ndarray,
    affine: np.ndarray,
    criteria: Criteria | None = None,
) -> StudyAnatomy:
    """Measure every level of ``label_map`` against the cord mask (same grid).

    Parameters
    ----------
    label_map
        ``(k, j, i)`` labels 1..7 = C1..C7 (others ignored).
    cord
        Boolean spinal-cord mask on the same grid.
    affine
        ``(k, j, i) -> LPS`` of that grid.
    """
    crit = criteria or Criteria()
    out = StudyAnatomy(case)
    lo, hi = crit.anterior_mm
    for value, name in enumerate(VERTEBRAE, start=1):
        idx = np.argwhere(label_map == value)
        if idx.size == 0:
            continue
        pts = (affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
        centre = pts.mean(axis=0)
        body = pts[pts[:, 1] <= centre[1]]  # LPS +y is posterior: the anterior half
        body_c = body.mean(axis=0) if len(body) else centre
        k = _nearest_cord_slice(cord, int(np.rint(idx[:, 0].mean())), affine, crit)
        at = np.argwhere(cord[k]) if k is not None else np.empty((0, 2))
        if at.size == 0:
            out.levels.append(
                LevelPosition(name, float(centre[2]), None, None, False, "no cord at its level")
            )
            continue
        cord_c = (affine @ np.r_[k, at.mean(axis=0), 1.0])[:3]
        anterior = float(cord_c[1] - body_c[1])
        lateral = float(abs(body_c[0] - cord_c[0]))
        why = []
        if not lo <= anterior <= hi:
            why.append(f"{anterior:.0f} mm anterior (allowed {lo:g}-{hi:g})")
        if lateral > crit.max_lateral_mm:
            why.append(f"{lateral:.0f} mm beside the cord")
        out.levels.append(
            LevelPosition(name, float(centre[2]), anterior, lateral, not why, "; ".join(why))
        )
    zs = [lv.z_mm for lv in out.levels]
    out.in_order = all(a > b for a, b in pairwise(zs))  # C1 highest
    enough = out.found >= crit.min_levels
    out.passed = enough and out.in_order and all(lv.ok for lv in out.levels)
    notes = []
    if not enough:
        notes.append(f"{out.found} of 7 levels found")
    if not out.in_order:
        notes.append("levels out of craniocaudal order")
    notes += [f"{lv.level}: {lv.why}" for lv in out.levels if not lv.ok]
    out.note = "; ".join(notes)
    return out


def summary(studies: list[StudyAnatomy], criteria: Criteria | None = None) -> dict[str, Any]:
    """Pass rate and per-level statistics of a set of measured studies."""
    crit = criteria or Criteria()
    n = len(studies)
    levels = [lv for s in studies for lv in s.levels]
    ant = [lv.anterior_mm for lv in levels if lv.anterior_mm is not None]
    lat = [lv.lateral_mm for lv in levels if lv.lateral_mm is not None]
    return {
        "criteria": asdict(crit),
        "studies": n,
        "passed": sum(s.passed for s in studies),
        "pass_rate": (sum(s.passed for s in studies) / n) if n else None,
        "mean_levels_found": float(np.mean([s.found for s in studies])) if n else None,
        "levels_placed_ok": sum(lv.ok for lv in levels),
        "levels_found": len(levels),
        "anterior_mm_median": float(np.median(ant)) if ant else None,
        "lateral_mm_median": float(np.median(lat)) if lat else None,
        "cases": [
            {
                "case": s.case,
                "found": s.found,
                "in_order": s.in_order,
                "passed": s.passed,
                "note": s.note,
                "levels": [asdict(lv) for lv in s.levels],
            }
            for s in studies
        ],
    }


OPENKBP_CORD = 102
"""Label of the spinal cord in the OpenKBP structure maps."""


def evaluate_folder(
    folder: Path,
    predict: Any,
    *,
    negatives: list[Path] | None = None,
    criteria: Criteria | None = None,
) -> dict[str, Any]:
    """Measure ``predict(volume) -> label map`` on every case of an OpenKBP-layout folder
    (``ct/pt_N_ct.nii.gz`` with ``structures/pt_N_structures.nii.gz``) and count the
    C1..C7 voxels it labels on each non-cervical CT of ``negatives`` (NIfTI files or
    DICOM series folders)."""
    from ai.volume import load_series

    studies = []
    for ct in sorted((folder / "ct").glob("*_ct.nii.gz")):
        case = ct.name[: -len("_ct.nii.gz")]
        vol = nifti_volume(ct)
        cord = nifti_mask(folder / "structures" / f"{case}_structures.nii.gz", OPENKBP_CORD)
        studies.append(measure(case, np.asarray(predict(vol)), cord, vol.affine, criteria))
    report = summary(studies, criteria)
    negs = []
    for path in negatives or []:
        if path.is_dir():
            vol = load_series(sorted(p for p in path.iterdir() if p.is_file()))
        else:
            vol = nifti_volume(path)
        labels = np.asarray(predict(vol))
        voxels = int(np.count_nonzero((labels >= 1) & (labels <= 7)))
        negs.append({"file": str(path), "c1_c7_voxels": voxels, "passed": voxels == 0})
    report["negatives"] = negs
    return report
