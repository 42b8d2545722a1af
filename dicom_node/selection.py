"""Pick the series to analyse in a study, by configurable rules, and say why.

Rules, in order (``[selection]`` settings):

1. CT (the Modality, or a CT storage SOP class when Modality is absent), ImageType
   ORIGINAL/PRIMARY, axial (slice normal within ``max_obliquity_degrees`` of the
   patient's foot-head axis);
2. not a localizer;
3. at least ``min_slices`` images covering ``min_coverage_mm``;
4. thinnest SliceThickness;
5. a bone kernel preferred over a soft-tissue one (ConvolutionKernel patterns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from config.settings import SelectionSettings
from dicom_node.validate import CT_STORAGE_SOP_CLASSES


@dataclass
class SeriesCandidate:
    """One stored series and its files.

    ``headers`` holds the parsed headers (no pixel data) of the readable files, by path:
    :func:`select_series` reads them once and keeps them on the chosen series only, so
    the volume loader and the writers use them instead of parsing the files again.
    """

    series_instance_uid: str
    paths: list[Path]
    series_number: int | None = None
    description: str = ""
    rejected: list[str] = field(default_factory=list)
    thickness: float = math.inf
    kernel: str = ""
    kernel_rank: int = 1
    headers: dict[Path, Dataset] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Selection:
    """The outcome: the chosen series (or none) and a note explaining the choice."""

    series: SeriesCandidate | None
    note: str


def _kernel_rank(kernel: str, rules: SelectionSettings) -> int:
    upper = kernel.upper()
    if any(p.upper() in upper for p in rules.bone_kernel_patterns):
        return 0
    if any(p.upper() in upper for p in rules.soft_kernel_patterns):
        return 2
    return 1


def _read_headers(paths: list[Path]) -> dict[Path, Dataset]:
    """The headers of the readable files among ``paths``, in order."""
    headers: dict[Path, Dataset] = {}
    for path in paths:
        try:
            headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
    return headers


def _check_kind(cand: SeriesCandidate, first: Dataset, rules: SelectionSettings) -> None:
    """Rules 1 and 2 as far as the first header tells: CT, ORIGINAL/PRIMARY, no localizer."""
    modality = str(first.get("Modality", "") or "")
    sop_class = str(first.file_meta.get("MediaStorageSOPClassUID", ""))
    if modality and modality not in rules.modalities:
        cand.rejected.append(f"modality {modality}")
    elif not modality and sop_class not in CT_STORAGE_SOP_CLASSES:
        cand.rejected.append("not a CT storage SOP class")
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    if image_type:
        missing = [t for t in rules.require_image_type if t not in image_type[:2]]
        if missing:
            cand.rejected.append(f"ImageType {'/'.join(image_type[:3])} is not ORIGINAL/PRIMARY")
        excluded = [t for t in rules.exclude_image_types if t in image_type]
        if excluded:
            cand.rejected.append(f"{excluded[0].lower()} image")


def _check_geometry(
    cand: SeriesCandidate, headers: list[Dataset], rules: SelectionSettings
) -> None:
    """Rules 1 and 3: axial, enough images covering enough of the patient."""
    first = headers[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1 and len(headers) == 1:
        frames = int(first.NumberOfFrames)
    else:
        frames = len(headers)
    iop = first.get("ImageOrientationPatient")
    positions = [h.get("ImagePositionPatient") for h in headers]
    if iop is None or any(p is None for p in positions):
        cand.rejected.append("no image geometry")
        return
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    cosine = abs(float(normal[2])) / float(np.linalg.norm(normal))
    angle = math.degrees(math.acos(min(1.0, cosine)))
    if angle > rules.max_obliquity_degrees:
        cand.rejected.append(f"not axial (normal {angle:.0f} deg from the z axis)")
    along = sorted(float(np.dot(np.asarray(p, float), normal)) for p in positions)
    coverage = along[-1] - along[0] if along else 0.0
    if frames < rules.min_slices:
        cand.rejected.append(f"{frames} images < {rules.min_slices}")
    elif coverage < rules.min_coverage_mm:
        cand.rejected.append(f"covers {coverage:.0f} mm < {rules.min_coverage_mm:.0f} mm")


def _inspect(cand: SeriesCandidate, rules: SelectionSettings) -> None:
    cand.headers = _read_headers(cand.paths)
    headers = list(cand.headers.values())
    if not headers:
        cand.rejected.append("no readable instance")
        return
    first = headers[0]
    _check_kind(cand, first, rules)
    _check_geometry(cand, headers, rules)
    try:
        cand.thickness = float(first.get("SliceThickness") or math.inf)
    except (TypeError, ValueError):
        cand.thickness = math.inf
    kernel = first.get("ConvolutionKernel") or ""
    cand.kernel = (
        "\\".join(kernel) if isinstance(kernel, list | pydicom.multival.MultiValue) else str(kernel)
    )
    cand.kernel_rank = _kernel_rank(cand.kernel, rules)
    cand.description = str(first.get("SeriesDescription", "") or "")


def _rank(cand: SeriesCandidate) -> tuple[float, int, int]:
    """Sort key of an eligible series: thinnest slices, bone kernel, most images."""
    return (cand.thickness, cand.kernel_rank, -len(cand.paths))


def select_series(candidates: list[SeriesCandidate], rules: SelectionSettings) -> Selection:
    """Apply the rules and return the chosen series with the reason for every decision."""
    leader: SeriesCandidate | None = None  # the best so far keeps its headers, no other
    for cand in candidates:
        _inspect(cand, rules)
        if cand.rejected or (leader is not None and _rank(leader) <= _rank(cand)):
            cand.headers = {}
            continue
        if leader is not None:
            leader.headers = {}
        leader = cand
    eligible = [c for c in candidates if not c.rejected]
    lines = [
        f"series #{c.series_number}: {'; '.join(c.rejected)}" for c in candidates if c.rejected
    ]
    if not eligible:
        return Selection(None, "no eligible series (" + " | ".join(lines or ["no series"]) + ")")
    eligible.sort(key=_rank)
    best = eligible[0]
    why = (
        f"series #{best.series_number} chosen: {len(best.paths)} axial images, "
        f"{best.thickness:g} mm slices, kernel {best.kernel or 'unknown'}"
    )
    others = [c for c in eligible[1:]]
    if others:
        why += "; also eligible: " + ", ".join(
            f"#{c.series_number} ({c.thickness:g} mm, kernel {c.kernel or '?'})" for c in others
        )
    if lines:
        why += "; excluded: " + " | ".join(lines)
    return Selection(best, why)
