"""Build a CT volume from the DICOM files of one series.

:func:`load_series` reads every header first (no pixel data), checks the geometry,
sorts the slices by their position projected on the slice normal (never by
InstanceNumber or file name), and only then decodes the pixels one slice at a time
into a preallocated int16 array, applying the rescale slope and intercept. Peak
memory is therefore about one int16 volume plus one decoded slice.

Conventions (see :mod:`ai.types`): the volume is indexed ``[slice, row, column]``,
slices ascend along the slice normal ``n = row_direction x column_direction``
(for an axial series: inferior to superior), and ``affine`` maps ``(k, j, i, 1)``
to LPS millimetres. Note that highdicom's own ``Volume`` default orders slices
the other way (right-handed); the direction is always explicit in ``affine``.

Geometry policy
---------------
The regular-volume check is done by highdicom
(:func:`highdicom.spatial.get_series_volume_positions`); the headers are passed to it
as minimal proxies so that RSNA-style stripped headers (no Modality, no SOP Class UID
in the dataset, no Frame of Reference UID) work. When highdicom finds the series
irregular, the loader diagnoses why itself:

=====================  ==========================  ====================================
problem                ``allow_issues=True``       ``allow_issues=False``
=====================  ==========================  ====================================
duplicate positions    keep one, issue             :class:`DuplicatePositionsError`
                       ``duplicate_positions``
gaps                   median step, issue ``gap``  :class:`SliceGapError`
uneven spacing         median step, issue          :class:`UnevenSpacingError`
                       ``uneven_spacing``
gantry tilt            sheared affine (exact),     :class:`GantryTiltError`
                       issue ``gantry_tilt``
non-axial orientation  volume built, issue         :class:`NonAxialError`
                       ``non_axial``
mixed Rows/Columns     largest group kept, issue   :class:`MixedDimensionsError`
                       ``mixed_dimensions``
lossy compression      volume built, issue         :class:`LossyCompressionError`
                       ``lossy_compression``
localizer images       dropped, issue              (same)
                       ``localizer_dropped``
=====================  ==========================  ====================================

Always refused (``VolumeError`` subclasses): unreadable files or pixel data
(:class:`SeriesReadError`), missing position/orientation/spacing
(:class:`MissingGeometryError`), slices with different orientations
(:class:`MixedOrientationError`), a Modality other than CT (:class:`NotCTError`),
and an empty series.

Enhanced (multi-frame) CT is supported when the per-frame functional groups give
every frame a position; each frame becomes one slice.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from highdicom.spatial import get_series_volume_positions
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.uid import CTImageStorage

from ai.compression import is_lossy
from ai.errors import VolumeError
from ai.types import CTVolume, GeometryIssue, SeriesFacts

logger = logging.getLogger(__name__)

ORIENTATION_TOL = 1e-3
"""Maximum difference between direction-cosine components of two slices."""
DUPLICATE_TOL_MM = 0.01
"""Two slices closer than this along the normal occupy the same position."""
SPACING_RTOL = 0.01
"""Relative tolerance on slice steps before spacing counts as uneven (as highdicom)."""
SPACING_ATOL_MM = 0.02
"""Absolute tolerance on slice steps (whichever of the two tolerances is larger)."""
GAP_FACTOR = 1.5
"""A step longer than this times the median step is a gap (missing slices)."""
TILT_TOL = 1e-3
"""Stacking counts as tilted when ``1 - cos(angle to the normal)`` exceeds this."""


class SeriesReadError(VolumeError):
    """A file of the series cannot be read or its pixels cannot be decoded."""


class MissingGeometryError(VolumeError):
    """Position, orientation or pixel spacing is missing."""


class MixedOrientationError(VolumeError):
    """The slices do not share one orientation."""


class NotCTError(VolumeError):
    """The series is not CT."""


class DuplicatePositionsError(VolumeError):
    """Several slices occupy the same position."""


class SliceGapError(VolumeError):
    """Slices are missing (a step is much longer than the others)."""


class UnevenSpacingError(VolumeError):
    """The slice spacing varies."""


class GantryTiltError(VolumeError):
    """Slices are stacked obliquely to their normal (gantry tilt)."""


class NonAxialError(VolumeError):
    """The slices are not axial."""


class MixedDimensionsError(VolumeError):
    """Slices have different Rows/Columns."""


class LossyCompressionError(VolumeError):
    """Some slices were lossy-compressed."""


_ISSUE_ERRORS: dict[str, type[VolumeError]] = {
    "duplicate_positions": DuplicatePositionsError,
    "gap": SliceGapError,
    "uneven_spacing": UnevenSpacingError,
    "gantry_tilt": GantryTiltError,
    "non_axial": NonAxialError,
    "mixed_dimensions": MixedDimensionsError,
    "lossy_compression": LossyCompressionError,
}


@dataclass
class _Slice:
    """Header facts of one frame; the dataset itself is not kept."""

    path: Path
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float
    uid: str
    lossy: bool
    thickness: float | None
    kernel: str | None = None
    contrast: str | None = None
    body_part: str | None = None


def _text(ds: Dataset, keyword: str) -> str | None:
    """An attribute as one string (``None`` when absent, values joined by ``\\``)."""
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _floats(value: object, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise MissingGeometryError(f"{path.name}: {what} is not numeric: {exc}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise MissingGeometryError(f"{path.name}: {what} must hold {n} finite numbers")
    return arr


def _first(seq_owner: Dataset | None, seq: str, attr: str) -> Any:
    """``attr`` of the first item of ``seq`` in ``seq_owner`` (a DICOM value), else None."""
    if seq_owner is None or seq not in seq_owner or not seq_owner[seq].value:
        return None
    return seq_owner[seq].value[0].get(attr)


def _is_lossy(ds: Dataset) -> bool:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return is_lossy(ts, ds.get("LossyImageCompression"))


def _facts(ds: Dataset) -> dict[str, str | None]:
    """Kernel, contrast agent and body part as the header states them."""
    kernel = _text(ds, "ConvolutionKernel")
    if kernel is None:  # enhanced CT keeps it in the CT Reconstruction functional group
        kernel = next(
            (
                str(item.get("ConvolutionKernel"))
                for seq in ("SharedFunctionalGroupsSequence",)
                for group in (ds.get(seq) or [])
                for item in (group.get("CTReconstructionSequence") or [])
                if item.get("ConvolutionKernel")
            ),
            None,
        )
    agent = _text(ds, "ContrastBolusAgent")
    return {"kernel": kernel, "contrast": agent, "body_part": _text(ds, "BodyPartExamined")}


def _read_headers(path: Path, ds: Dataset | None = None) -> tuple[list[_Slice], bool]:
    """Return the frames described by one file and whether it is a localizer.

    ``ds`` is the file's header when the caller has parsed it already.
    """
    if ds is None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError) as exc:
            raise SeriesReadError(f"{path.name}: not a readable DICOM file: {exc}") from exc
    modality = ds.get("Modality")
    if modality not in (None, "", "CT"):
        raise NotCTError(f"{path.name}: Modality is {modality!r}, only CT is accepted")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    localizer = "LOCALIZER" in image_type
    for attr in ("Rows", "Columns"):
        if ds.get(attr) is None:
            raise SeriesReadError(f"{path.name}: {attr} is missing; not an image")
    rows, cols = int(ds.Rows), int(ds.Columns)
    lossy = _is_lossy(ds)
    uid = str(ds.get("SOPInstanceUID", ""))
    n_frames = int(ds.get("NumberOfFrames") or 1)
    thickness = ds.get("SliceThickness")
    if "PerFrameFunctionalGroupsSequence" in ds:
        facts = _facts(ds)
        shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
        frames: list[_Slice] = []
        for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):

            def pick(seq: str, attr: str, item: Dataset = item) -> Any:
                value = _first(item, seq, attr)
                return value if value is not None else _first(shared, seq, attr)

            ipp, iop = (
                pick("PlanePositionSequence", "ImagePositionPatient"),
                pick("PlaneOrientationSequence", "ImageOrientationPatient"),
            )
            ps = pick("PixelMeasuresSequence", "PixelSpacing")
            if ipp is None or iop is None or ps is None:
                raise MissingGeometryError(
                    f"{path.name}: frame {f + 1} has no plane position/orientation/pixel spacing"
                )
            slope = pick("PixelValueTransformationSequence", "RescaleSlope")
            intercept = pick("PixelValueTransformationSequence", "RescaleIntercept")
            th = pick("PixelMeasuresSequence", "SliceThickness")
            sp = _floats(ps, 2, "PixelSpacing", path)
            frames.append(
                _Slice(
                    path=path,
                    frame=f,
                    position=_floats(ipp, 3, "ImagePositionPatient", path),
                    orientation=_floats(iop, 6, "ImageOrientationPatient", path),
                    spacing=(float(sp[0]), float(sp[1])),
                    rows=rows,
                    cols=cols,
                    slope=float(slope) if slope is not None else 1.0,
                    intercept=float(intercept) if intercept is not None else 0.0,
                    uid=uid,
                    lossy=lossy,
                    thickness=float(th) if th is not None else None,
                    **facts,
                )
            )
        return frames, localizer
    if n_frames != 1:
        raise SeriesReadError(
            f"{path.name}: multi-frame image without per-frame functional groups has no "
            "per-frame geometry"
        )
    if ds.get("ImagePositionPatient") is None or ds.get("ImageOrientationPatient") is None:
        raise MissingGeometryError(
            f"{path.name}: ImagePositionPatient and ImageOrientationPatient are required"
        )
    if ds.get("PixelSpacing") is None:
        raise MissingGeometryError(f"{path.name}: PixelSpacing is required")
    sp = _floats(ds.PixelSpacing, 2, "PixelSpacing", path)
    return [
        _Slice(
            path=path,
            frame=None,
            position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", path),
            orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path),
            spacing=(float(sp[0]), float(sp[1])),
            rows=rows,
            cols=cols,
            slope=float(ds.get("RescaleSlope") or 1.0),
            intercept=float(ds.get("RescaleIntercept") or 0.0),
            uid=uid,
            lossy=lossy,
            thickness=float(thickness) if thickness not in (None, "") else None,
            **_facts(ds),
        )
    ], localizer


def _proxy(s: _Slice) -> Dataset:
    """A minimal dataset that highdicom's geometry functions accept."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.ImagePositionPatient = [float(v) for v in s.position]
    ds.ImageOrientationPatient = [float(v) for v in s.orientation]
    ds.PixelSpacing = list(s.spacing)
    ds.Rows, ds.Columns = s.rows, s.cols
    return ds


def _decode(s: _Slice, cache: dict[Path, Dataset]) -> np.ndarray:
    try:
        if s.frame is None:
            arr = pydicom.dcmread(s.path).pixel_array
        else:
            # Keep one multi-frame dataset open while its frames are decoded in turn.
            if s.path not in cache:
                cache.clear()
                cache[s.path] = pydicom.dcmread(s.path)
            arr = pixel_array(cache[s.path], index=s.frame)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        raise SeriesReadError(f"{s.path.name}: pixel data cannot be decoded: {exc}") from exc
    if arr.shape != (s.rows, s.cols):
        raise SeriesReadError(
            f"{s.path.name}: decoded pixels have shape {arr.shape}, expected "
            f"({s.rows}, {s.cols}); only monochrome CT is accepted"
        )
    return arr


def load_series(
    paths: Sequence[Path | str],
    *,
    allow_issues: bool = True,
    headers: Mapping[Path, Dataset] | None = None,
) -> CTVolume:
    """Build an int16 HU volume from the DICOM files of one CT series.

    Parameters
    ----------
    paths
        Files of one series, in any order.
    allow_issues
        When true, tolerable geometry problems (duplicates, gaps, uneven spacing,
        gantry tilt, non-axial orientation, mixed Rows/Columns, lossy compression)
        are recorded as :class:`ai.types.GeometryIssue` in ``CTVolume.issues``;
        when false each raises its :class:`ai.errors.VolumeError` subclass.
    headers
        Headers (read without pixel data) the caller has parsed already, by path; a
        file without one here is read. Only the pixel data is read again.

    Returns
    -------
    ai.types.CTVolume
        Volume ``[slice, row, column]``, slices ascending along the slice normal.

    Raises
    ------
    VolumeError
        A subclass naming the problem (see the module docstring).
    """
    if not paths:
        raise VolumeError("a series needs at least one file")
    issues: list[GeometryIssue] = []

    def issue(code: str, message: str) -> None:
        if not allow_issues:
            raise _ISSUE_ERRORS[code](message)
        logger.warning("volume issue code=%s %s", code, message)
        issues.append(GeometryIssue(code, message))

    slices: list[_Slice] = []
    n_localizers = 0
    for p in paths:
        path = Path(p)
        frames, localizer = _read_headers(path, None if headers is None else headers.get(path))
        if localizer:
            n_localizers += 1
            continue
        slices.extend(frames)
    if n_localizers:
        issues.append(
            GeometryIssue("localizer_dropped", f"{n_localizers} localizer image(s) left out")
        )
    if not slices:
        raise VolumeError("the series holds no usable CT image")

    dims = Counter((s.rows, s.cols) for s in slices)
    if len(dims) > 1:
        (rows, cols), _ = dims.most_common(1)[0]
        issue(
            "mixed_dimensions",
            f"slices have different Rows x Columns {sorted(dims)}; kept the {rows}x{cols} ones",
        )
        slices = [s for s in slices if (s.rows, s.cols) == (rows, cols)]

    orient = slices[0].orientation
    if any(np.max(np.abs(s.orientation - orient)) > ORIENTATION_TOL for s in slices):
        raise MixedOrientationError(
            "slices have different ImageOrientationPatient; one volume needs one orientation"
        )
    row_dir, col_dir = orient[:3], orient[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-2 or abs(np.linalg.norm(col_dir) - 1) > 1e-2:
        raise MissingGeometryError("ImageOrientationPatient direction cosines are not unit vectors")
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    if abs(normal[2]) < max(abs(normal[0]), abs(normal[1])):
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        issue("non_axial", f"slices are {plane}, not axial (normal {np.round(normal, 3).tolist()})")

    # Sort along the normal; ties broken by SOP Instance UID so file order never matters.
    slices.sort(key=lambda s: (round(float(s.position @ normal), 4), s.uid, s.frame or 0))
    proj = np.array([float(s.position @ normal) for s in slices])
    keep = [0]
    for idx in range(1, len(slices)):
        if proj[idx] - proj[keep[-1]] < DUPLICATE_TOL_MM:
            continue
        keep.append(idx)
    if len(keep) < len(slices):
        issue(
            "duplicate_positions",
            f"{len(slices) - len(keep)} slice(s) repeat a position already present; "
            "kept one per position",
        )
        slices = [slices[k] for k in keep]
        proj = proj[keep]

    n = len(slices)
    first = slices[0]
    step_vec: np.ndarray
    if n == 1:
        step_vec = normal * (first.thickness or 1.0)
    else:
        regular_spacing, indices = get_series_volume_positions(
            [_proxy(s) for s in slices], handedness="LEFT_HANDED"
        )
        if regular_spacing is not None and indices == list(range(n)):
            step_vec = (slices[-1].position - first.position) / (n - 1)
        else:
            steps = np.diff(np.stack([s.position for s in slices]), axis=0)
            along = np.diff(proj)
            median = float(np.median(along))
            step_vec = np.median(steps, axis=0)
            unit = steps / np.linalg.norm(steps, axis=1, keepdims=True)
            cosines = unit @ normal
            if np.any(1 - cosines > TILT_TOL):
                angle = math.degrees(math.acos(float(np.clip(np.median(cosines), -1, 1))))
                issue(
                    "gantry_tilt",
                    f"slices are stacked {angle:.1f} deg off their normal (gantry tilt); "
                    "the affine is sheared to match",
                )
            tol = max(SPACING_RTOL * median, SPACING_ATOL_MM)
            if np.any(along > GAP_FACTOR * median):
                issue(
                    "gap",
                    f"slice steps up to {along.max():.2f} mm against a median of {median:.2f} mm "
                    "(missing slices); the volume uses the median step",
                )
            elif np.any(np.abs(along - median) > tol):
                issue(
                    "uneven_spacing",
                    f"slice steps vary from {along.min():.2f} to {along.max():.2f} mm; "
                    f"the volume uses the median step {median:.2f} mm",
                )

    lossy = any(s.lossy for s in slices)
    if lossy:
        issue("lossy_compression", "some slices were lossy-compressed; HU values are approximate")

    affine = np.eye(4)
    affine[:3, 0] = step_vec
    affine[:3, 1] = col_dir * first.spacing[0]
    affine[:3, 2] = row_dir * first.spacing[1]
    affine[:3, 3] = first.position

    hu = np.empty((n, first.rows, first.cols), dtype=np.int16)
    lo, hi = np.iinfo(np.int16).min, np.iinfo(np.int16).max
    cache: dict[Path, Dataset] = {}
    for k, s in enumerate(slices):
        arr = _decode(s, cache).astype(np.float32)
        if s.slope != 1.0:
            arr *= np.float32(s.slope)
        if s.intercept != 0.0:
            arr += np.float32(s.intercept)
        np.rint(arr, out=arr)
        np.clip(arr, lo, hi, out=arr)
        hu[k] = arr
    cache.clear()
    logger.info(
        "volume built slices=%d rows=%d cols=%d issues=%d", n, first.rows, first.cols, len(issues)
    )
    thicknesses = [s.thickness for s in slices if s.thickness is not None and s.thickness > 0]
    facts = SeriesFacts(
        slice_thickness=max(thicknesses) if thicknesses else None,
        convolution_kernel=first.kernel or None,
        contrast_agent=first.contrast,
        body_part=first.body_part or None,
    )
    return CTVolume(
        hu=hu,
        affine=affine,
        source_sop_instance_uids=[s.uid for s in slices],
        issues=issues,
        lossy=lossy,
        facts=facts,
    )
