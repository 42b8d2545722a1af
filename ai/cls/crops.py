"""Per-vertebra crops for the stage-2 classifier.

For every vertebra C1..C7 the stage-1 label map (on the source grid) gives a region. A crop
is built from it in five steps:

1. **Presence.** A vertebra with no voxel in the label map is *not assessed* ("not in the
   field of view"). One whose mask is smaller than ``min_volume_mm3`` is *not assessed*
   ("mask too small"): a speck is a segmentation artefact, not a vertebra.
2. **Extent along the slices, threshold and fallback.** Slices whose vertebra area is at
   least ``slice_threshold`` (default 0.1) of the vertebra's largest slice area define its
   extent; this drops stray voxels that stage 1 sometimes leaves on a neighbour's slices.
   **Fallback:** when fewer than 3 slices pass, the full extent of the mask is used.
   The in-plane box is the bounding box of the mask on the kept slices.
3. **Margin.** The in-plane box is made square (in mm, around its centre) and grows by
   ``margin_fraction`` of its side plus ``margin_mm`` on each side; it is then clipped to
   the image (so a vertebra at the image edge gives a non-square region, stretched by the
   resize).
4. **Slices and channels.** ``n_slices`` (15) slice indices evenly spaced over the extent
   (``linspace`` rounded); each carries the slices ``i-2 .. i+2`` (clamped to the volume)
   as 5 channels, and the vertebra's own mask on slice ``i`` as the 6th channel (1 inside
   that vertebra, 0 elsewhere; other vertebrae are 0).
5. **Window and resize.** HU are windowed with a bone window, centre 400 / width 1800
   (-500..1300 HU, as the 3rd-place RSNA 2022 solution), scaled to [0, 1], and every
   channel is resized to ``size`` x ``size`` (bilinear, antialiased). The reference used
   224; the shipped CPU demo model uses a smaller size recorded in its ``model.json``.

Nothing here ever fabricates a tensor: a vertebra that cannot be cropped is returned with
``assessed=False`` and a reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional

from ai.types import VERTEBRAE, CTVolume


@dataclass(frozen=True)
class CropConfig:
    """How crops are cut (stored in the model package's input spec)."""

    size: int = 224
    n_slices: int = 15
    context: int = 2
    window_center: float = 400.0
    window_width: float = 1800.0
    margin_fraction: float = 0.1
    margin_mm: float = 4.0
    slice_threshold: float = 0.1
    min_volume_mm3: float = 300.0

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"crop size must be >= 8 pixels, got {self.size}")
        if self.n_slices < 1:
            raise ValueError(f"n_slices must be >= 1, got {self.n_slices}")
        if self.context < 0:
            raise ValueError(f"context must be >= 0, got {self.context}")
        if self.window_width <= 0:
            raise ValueError(f"window_width must be > 0, got {self.window_width}")
        if not 0.0 <= self.slice_threshold < 1.0:
            raise ValueError(f"slice_threshold must lie in [0, 1), got {self.slice_threshold}")

    @property
    def channels(self) -> int:
        """Image channels per slice plus the mask channel."""
        return 2 * self.context + 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropConfig:
        """Inverse of :meth:`to_dict` (unknown keys are refused)."""
        return cls(**d)


@dataclass
class VertebraCrop:
    """Where one vertebra was cropped, or why it was not.

    Attributes
    ----------
    label
        ``"C1"`` .. ``"C7"``.
    assessed
        Whether a crop exists (``crops`` holds it at position ``index``).
    reason
        Why the vertebra was not assessed (``None`` when assessed).
    visible
        Whether any voxel of the vertebra is in the label map.
    index
        Row of this vertebra in the crop batch, or ``None``.
    box
        ``(z0, z1, y0, y1, x0, x1)`` half-open voxel box the crop was taken from.
    slices
        The centre slice index of each of the ``n_slices`` crop slices.
    """

    label: str
    assessed: bool
    reason: str | None = None
    visible: bool = False
    index: int | None = None
    box: tuple[int, int, int, int, int, int] | None = None
    slices: list[int] = field(default_factory=list)


@dataclass
class CropBatch:
    """Crops of all assessable vertebrae of one volume.

    ``crops`` is float32 ``[n_assessed, n_slices, channels, size, size]``; ``vertebrae``
    has one entry per C1..C7.
    """

    crops: torch.Tensor
    vertebrae: list[VertebraCrop]

    @property
    def present(self) -> np.ndarray:
        """Boolean ``[7]``: which vertebrae have a crop."""
        return np.array([v.assessed for v in self.vertebrae], dtype=bool)


def _square_range(lo: int, hi: int, half: float, centre: float, limit: int) -> tuple[int, int]:
    a = int(np.floor(centre - half))
    b = int(np.ceil(centre + half))
    a = max(a, 0)
    b = min(b, limit)
    a = min(a, lo)
    b = max(b, hi)
    return a, b


def extract_crops(
    volume: CTVolume, label_map: np.ndarray, config: CropConfig = CropConfig()
) -> CropBatch:
    """Cut the stage-2 crops of C1..C7 from a volume and its label map.

    Parameters
    ----------
    volume
        The CT volume (HU, ``[slice, row, col]``).
    label_map
        uint8 labels on the same grid, 1..7 = C1..C7 (other values are ignored).
    config
        Crop parameters.

    Returns
    -------
    CropBatch
        The crops and, per vertebra, where it came from or why it is not assessed.

    Raises
    ------
    ValueError
        When the label map does not have the volume's shape.
    """
    hu = volume.hu
    if label_map.shape != hu.shape:
        raise ValueError(
            f"label map shape {label_map.shape} must equal the volume shape {hu.shape}"
        )
    n_z, n_y, n_x = hu.shape
    dz, dy, dx = volume.spacing
    voxel_mm3 = dz * dy * dx
    lm = label_map if label_map.dtype == np.uint8 else label_map.astype(np.uint8)
    objects = ndimage.find_objects(lm, max_label=len(VERTEBRAE))
    infos: list[VertebraCrop] = []
    pieces: list[torch.Tensor] = []
    lo_hu = config.window_center - config.window_width / 2.0
    for n, name in enumerate(VERTEBRAE, start=1):
        sl = objects[n - 1]
        if sl is None:
            infos.append(VertebraCrop(name, False, "not in the field of view", visible=False))
            continue
        sub = lm[sl] == n
        per_slice = sub.reshape(sub.shape[0], -1).sum(axis=1)
        total = int(per_slice.sum())
        if total * voxel_mm3 < config.min_volume_mm3:
            infos.append(
                VertebraCrop(
                    name,
                    False,
                    f"mask too small ({total * voxel_mm3:.0f} mm3 < {config.min_volume_mm3:.0f})",
                    visible=True,
                )
            )
            continue
        z_off = sl[0].start
        keep = np.nonzero(per_slice >= config.slice_threshold * per_slice.max())[0]
        if keep.size and keep[-1] - keep[0] + 1 >= 3:
            z0, z1 = z_off + int(keep[0]), z_off + int(keep[-1]) + 1
            kept = sub[keep[0] : keep[-1] + 1]
        else:  # fallback: full extent
            nz = np.nonzero(per_slice)[0]
            z0, z1 = z_off + int(nz[0]), z_off + int(nz[-1]) + 1
            kept = sub[nz[0] : nz[-1] + 1]
        rows = np.nonzero(kept.any(axis=(0, 2)))[0]
        cols = np.nonzero(kept.any(axis=(0, 1)))[0]
        y0, y1 = sl[1].start + int(rows[0]), sl[1].start + int(rows[-1]) + 1
        x0, x1 = sl[2].start + int(cols[0]), sl[2].start + int(cols[-1]) + 1
        side_mm = max((y1 - y0) * dy, (x1 - x0) * dx)
        half_mm = side_mm / 2.0 * (1.0 + 2.0 * config.margin_fraction) + config.margin_mm
        y0, y1 = _square_range(y0, y1, half_mm / dy, (y0 + y1) / 2.0, n_y)
        x0, x1 = _square_range(x0, x1, half_mm / dx, (x0 + x1) / 2.0, n_x)
        centres = np.rint(np.linspace(z0, z1 - 1, config.n_slices)).astype(np.int64)
        offsets = np.arange(-config.context, config.context + 1)
        idx = np.clip(centres[:, None] + offsets[None, :], 0, n_z - 1)
        img = hu[idx.ravel(), y0:y1, x0:x1].astype(np.float32)
        img = np.clip((img - lo_hu) / config.window_width, 0.0, 1.0)
        img = img.reshape(config.n_slices, offsets.size, y1 - y0, x1 - x0)
        mask = (lm[centres, y0:y1, x0:x1] == n).astype(np.float32)[:, None]
        stack = torch.from_numpy(np.concatenate([img, mask], axis=1))
        resized = functional.interpolate(
            stack,
            size=(config.size, config.size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        pieces.append(resized.clamp_(0.0, 1.0))
        infos.append(
            VertebraCrop(
                name,
                True,
                None,
                visible=True,
                index=len(pieces) - 1,
                box=(z0, z1, y0, y1, x0, x1),
                slices=[int(c) for c in centres],
            )
        )
    if pieces:
        crops = torch.stack(pieces)
    else:
        crops = torch.zeros((0, config.n_slices, config.channels, config.size, config.size))
    return CropBatch(crops=crops, vertebrae=infos)
