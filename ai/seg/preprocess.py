"""Stage-1 preprocessing: canonical orientation, body crop, intensity normalisation,
resampling to the working grid and back.

Every step here is shared by training and inference, so a model sees exactly the
same input in both.

Canonical orientation
    The model always sees the volume with axis 0 running inferior -> superior,
    axis 1 anterior -> posterior and axis 2 right -> left (the layout of a standard
    axial series, ``ImageOrientationPatient = [1,0,0,0,1,0]`` with slices ascending).
    :func:`canonical_view` finds the axis permutation and flips from the affine and
    returns a numpy *view* (no copy); :func:`to_source` undoes it.

Body crop
    In-plane, the working grid covers only the bounding box of the voxels above
    ``body_hu`` (plus a margin), so the neck, not the air around it, fills the
    working grid. Voxels outside the box get label 0.

Two passes (coarse to fine)
    With ``two_pass`` (default) the network first sees the whole (body-cropped) field of
    view; the bounding box of its C1..C7 prediction plus ``roi_margin_mm`` becomes the
    region of interest, and a second pass on that region alone gives the final labels.
    The working grid then spans about 10 cm instead of the whole field of view, which
    more than doubles the effective resolution. The same network serves both passes: it
    is trained on full views and on randomly padded spine crops.

Normalisation
    ``bone_window`` (default): HU clipped to ``[low, high]`` and scaled to [0, 1];
    ``minmax``: the per-volume min-max the reference code used (kept for comparison).

Resampling
    Down: area averaging (separable: in-plane per slab of slices, then along the slice
    axis), so the whole volume is never held as float. Up: separable linear
    interpolation (``align_corners=False``) of the logits, evaluated slab by slab.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

SLAB = 32
"""Source slices read at once when resampling down to the working grid."""
UP_SLAB = 2
"""Source slices produced at once when resampling logits back (7 float channels each).

Each slice is interpolated on its own, so the slab size changes no value (beyond the last
float32 bit of the sigmoid at the tail of a vectorised buffer); two slices
keep each slab's buffers (7 x 2 x Y x X float32, 13 MB for a whole 468 x 512 field)
under the worker's 16 MiB mmap threshold, where the heap reuses them slab after slab."""


@dataclass(frozen=True)
class InputSpec:
    """How a volume becomes the network input (stored in ``model.json["input"]``)."""

    size: tuple[int, int, int] = (64, 64, 64)
    normalization: str = "bone_window"
    window: tuple[float, float] = (-500.0, 1500.0)
    crop_body: bool = True
    body_hu: float = -300.0
    margin_mm: float = 10.0
    two_pass: bool = True
    roi_margin_mm: float = 10.0

    def __post_init__(self) -> None:
        if len(self.size) != 3 or any(int(s) < 16 or int(s) % 16 for s in self.size):
            raise ValueError(f"working size must be 3 multiples of 16 (>= 16), got {self.size}")
        if self.normalization not in ("bone_window", "minmax"):
            raise ValueError(
                f"normalization must be 'bone_window' or 'minmax', got {self.normalization!r}"
            )
        if not self.window[0] < self.window[1]:
            raise ValueError(f"window low must be below high, got {self.window}")

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for ``model.json``."""
        return {
            "size": list(self.size),
            "normalization": self.normalization,
            "window": list(self.window),
            "crop_body": self.crop_body,
            "body_hu": self.body_hu,
            "margin_mm": self.margin_mm,
            "two_pass": self.two_pass,
            "roi_margin_mm": self.roi_margin_mm,
            "orientation": "axis0 inferior->superior, axis1 anterior->posterior, axis2 right->left",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_json`."""
        return cls(
            size=tuple(int(s) for s in data["size"]),  # type: ignore[arg-type]
            normalization=str(data.get("normalization", "bone_window")),
            window=tuple(float(w) for w in data.get("window", (-500.0, 1500.0))),  # type: ignore[arg-type]
            crop_body=bool(data.get("crop_body", True)),
            body_hu=float(data.get("body_hu", -300.0)),
            margin_mm=float(data.get("margin_mm", 10.0)),
            two_pass=bool(data.get("two_pass", False)),
            roi_margin_mm=float(data.get("roi_margin_mm", 10.0)),
        )


@dataclass(frozen=True)
class Canon:
    """Axis permutation and flips that take a source volume to canonical order."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]


def canonical_transform(affine: np.ndarray) -> Canon:
    """Work out the permutation/flips that put a volume in canonical orientation.

    Parameters
    ----------
    affine
        4x4 voxel ``(k, j, i)`` -> LPS matrix.
    """
    cols = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    unit = cols / np.where(norms == 0, 1, norms)
    # Canonical axis c wants the patient direction: 0 -> +S (LPS z), 1 -> +P (y), 2 -> +L (x).
    wanted = (2, 1, 0)
    perm: list[int] = []
    flip: list[bool] = []
    free = [0, 1, 2]
    for patient_axis in wanted:
        best = max(free, key=lambda a: abs(unit[patient_axis, a]))
        free.remove(best)
        perm.append(best)
        flip.append(bool(unit[patient_axis, best] < 0))
    spacing = tuple(float(norms[a]) for a in perm)
    return Canon(tuple(perm), tuple(flip), spacing)  # type: ignore[arg-type]


def canonical_view(array: np.ndarray, canon: Canon) -> np.ndarray:
    """Return a view of ``array`` in canonical orientation (no copy)."""
    view = np.transpose(array, canon.perm)
    slices = tuple(slice(None, None, -1) if f else slice(None) for f in canon.flip)
    return view[slices]


def body_box(
    view: np.ndarray, spec: InputSpec, spacing: tuple[float, float, float]
) -> tuple[int, int, int, int]:
    """In-plane bounding box ``(y0, y1, x0, x1)`` of the body in a canonical view."""
    ny, nx = view.shape[1], view.shape[2]
    if not spec.crop_body:
        return 0, ny, 0, nx
    step = max(1, view.shape[0] // 64)
    mip = np.zeros((ny, nx), dtype=bool)
    for k in range(0, view.shape[0], step):
        mip |= view[k] > spec.body_hu
    rows = np.flatnonzero(mip.any(axis=1))
    cols = np.flatnonzero(mip.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return 0, ny, 0, nx
    my = round(spec.margin_mm / max(spacing[1], 1e-3))
    mx = round(spec.margin_mm / max(spacing[2], 1e-3))
    y0, y1 = max(0, rows[0] - my), min(ny, rows[-1] + 1 + my)
    x0, x1 = max(0, cols[0] - mx), min(nx, cols[-1] + 1 + mx)
    # Require a minimal size so tiny boxes do not explode the working resolution.
    min_y, min_x = min(ny, spec.size[1]), min(nx, spec.size[2])
    if y1 - y0 < min_y:
        y0 = max(0, min(y0, ny - min_y))
        y1 = y0 + min_y
    if x1 - x0 < min_x:
        x0 = max(0, min(x0, nx - min_x))
        x1 = x0 + min_x
    return int(y0), int(y1), int(x0), int(x1)


def _normalize(t: torch.Tensor, spec: InputSpec, lo_hi: tuple[float, float]) -> torch.Tensor:
    lo, hi = lo_hi
    t = t.float()
    if spec.normalization == "bone_window":
        lo, hi = spec.window
        t = t.clamp_(lo, hi)
    return (t - lo) / max(hi - lo, 1e-6)


def _normalize_(t: torch.Tensor, spec: InputSpec, lo_hi: tuple[float, float]) -> torch.Tensor:
    """:func:`_normalize` in place on a float32 tensor (the same operations, same order)."""
    lo, hi = lo_hi
    if spec.normalization == "bone_window":
        lo, hi = spec.window
        t.clamp_(lo, hi)
    return t.sub_(lo).div_(max(hi - lo, 1e-6))


def _resize_1d_axis0(t: torch.Tensor, n: int) -> torch.Tensor:
    """Resize ``t`` of shape (D, ...) along axis 0 to ``n`` (area down, linear up)."""
    d = t.shape[0]
    if d == n:
        return t
    rest = t.shape[1:]
    flat = t.reshape(d, -1).T.unsqueeze(0)  # (1, M, D)
    if n < d:
        out = F.adaptive_avg_pool1d(flat, n)
    else:
        out = F.interpolate(flat, size=n, mode="linear", align_corners=False)
    return out[0].T.reshape(n, *rest)


Box = tuple[int, int, int, int, int, int]
"""``(z0, z1, y0, y1, x0, x1)`` in canonical voxel indices (end exclusive)."""


def prepare_input(
    hu: np.ndarray, affine: np.ndarray, spec: InputSpec, roi: Box | None = None
) -> tuple[torch.Tensor, Canon, Box]:
    """Turn an int16 HU volume into the network input ``(1, 1, *spec.size)``.

    Parameters
    ----------
    hu, affine
        The volume and its voxel-to-LPS matrix.
    spec
        The model's input spec.
    roi
        Canonical region to resample; ``None``: all slices and the in-plane body box.

    Returns
    -------
    tuple
        The input tensor, the :class:`Canon` transform and the region used.
    """
    canon = canonical_transform(affine)
    view = canonical_view(hu, canon)
    if roi is None:
        roi = (0, view.shape[0], *body_box(view, spec, canon.spacing))
    z0, z1, y0, y1, x0, x1 = roi
    lo_hi = (float(hu.min()), float(hu.max())) if spec.normalization == "minmax" else spec.window
    d, h, w = spec.size
    # One float32 slab buffer, reused: converting, windowing and scaling happen in it, so
    # the slab loop allocates nothing large (fresh 30 MB temporaries per slab cost page
    # faults or, in glibc's heap, fragmentation that outlived the call).
    region = view[z0:z1, y0:y1, x0:x1]  # a view
    buf = torch.empty((min(SLAB, region.shape[0]), *region.shape[1:]), dtype=torch.float32)
    planes = []
    for start in range(0, region.shape[0], SLAB):
        t = buf[: min(SLAB, region.shape[0] - start)]
        np.copyto(t.numpy(), region[start : start + SLAB], casting="unsafe")
        _normalize_(t, spec, lo_hi)
        planes.append(_resize_2d(t.unsqueeze(1), h, w))  # (s, 1, Y, X) -> (s, 1, h, w)
    del buf
    low = torch.cat(planes, dim=0)[:, 0]  # (Z, h, w)
    low = _resize_1d_axis0(low, d)
    return low[None, None].contiguous(), canon, roi


def _resize_2d(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area-average down (or bilinear up) the last two axes of ``(n, c, Y, X)``."""
    if t.shape[-2] >= h and t.shape[-1] >= w:
        return F.adaptive_avg_pool2d(t, (h, w))
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)


def roi_from_mask(
    mask: np.ndarray,
    region: Box,
    shape: tuple[int, int, int],
    spacing: tuple[float, ...],
    margin_mm: float | tuple[float, ...],
    min_size: int = 32,
) -> Box | None:
    """Canonical source box around the true voxels of ``mask`` plus a margin.

    ``mask`` is sampled on ``region`` (any resolution: its voxels are scaled onto the
    region's extent). ``margin_mm`` is one value or six (low/high per axis).
    Returns ``None`` when the mask is empty.
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    margins = (margin_mm,) * 6 if isinstance(margin_mm, (int, float)) else tuple(margin_mm)
    out: list[int] = []
    for axis in range(3):
        r0, r1 = region[2 * axis], region[2 * axis + 1]
        scale = (r1 - r0) / mask.shape[axis]
        lo = r0 + math.floor(idx[:, axis].min() * scale)
        hi = r0 + math.ceil((idx[:, axis].max() + 1) * scale)
        lo -= round(margins[2 * axis] / spacing[axis])
        hi += round(margins[2 * axis + 1] / spacing[axis])
        lo, hi = max(0, lo), min(shape[axis], hi)
        need = min(min_size, shape[axis])
        if hi - lo < need:
            mid = (lo + hi) // 2
            lo = max(0, min(mid - need // 2, shape[axis] - need))
            hi = lo + need
        out.extend((int(lo), int(hi)))
    return tuple(out)  # type: ignore[return-value]


def prepare_labels(
    labels: np.ndarray, affine: np.ndarray, spec: InputSpec, roi: Box
) -> torch.Tensor:
    """Resample a uint8 label map (0 = background, 1..7 = C1..C7, others ignored) over
    ``roi`` to the working grid as 7 *soft* channels ``(7, *spec.size)``: the fraction of
    each working voxel covered by the label (area-averaged one-hot, like the image).
    Training on these fractions teaches the network partial volumes, so the linearly
    upsampled logits place boundaries at sub-voxel precision on the source grid."""
    canon = canonical_transform(affine)
    view = canonical_view(labels, canon)
    z0, z1, y0, y1, x0, x1 = roi
    d, h, w = spec.size
    planes = []
    for start in range(z0, z1, SLAB):
        chunk = torch.from_numpy(
            np.ascontiguousarray(view[start : min(start + SLAB, z1), y0:y1, x0:x1])
        )
        onehot = torch.stack([(chunk == c).float() for c in range(1, 8)], dim=1)
        planes.append(_resize_2d(onehot, h, w))
    low = torch.cat(planes, dim=0)  # (Z, 7, h, w)
    low = _resize_1d_axis0(low, d)  # (d, 7, h, w)
    return low.permute(1, 0, 2, 3).contiguous()


def iter_source_slabs(logits: torch.Tensor, roi: Box) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, probs)`` slabs of sigmoid probabilities on the canonical source grid.

    ``logits`` has shape ``(7, d, h, w)`` over ``roi``; each yielded tensor has shape
    ``(7, s, y1 - y0, x1 - x0)`` for canonical slices ``start .. start + s``.
    """
    z0, z1, y0, y1, x0, x1 = roi
    along = _resize_1d_axis0(logits.permute(1, 0, 2, 3).float(), z1 - z0)  # (Z, 7, h, w)
    for start in range(0, z1 - z0, UP_SLAB):
        chunk = along[start : start + UP_SLAB]
        up = F.interpolate(chunk, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        yield z0 + start, up.sigmoid_().permute(1, 0, 2, 3)  # in place: one buffer per slab
