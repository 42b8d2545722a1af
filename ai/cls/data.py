"""Cached stage-2 training crops from an RSNA 2022 layout.

Crops come from stage-1 *predictions* by default (``source="stage1"``), as in the
reference recipe: segmentations exist for few studies, so the stage-1 model labels every
study and the classifier learns on what it will see at inference. ``source="truth"``
uses the dataset's segmentations instead (development, or pre-training before a stage-1
model exists; studies without one are skipped). Truth masks are *closed* first
(:func:`close_label_map`): a synthetic truth mask has the fracture gap cut out of it, which
a stage-1 prediction never reproduces, and left as is the mask channel would give the
answer away. Each study's crops are cached as ``<cache>/<key>/<uid>.npz`` (uint8 crops,
presence, labels, slice labels, box maps); ``key`` hashes the crop config, the source and
the stage-1 model's sha256, so a different model or crop setting never reuses stale crops.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ai.cls.crops import CropBatch, CropConfig, extract_crops
from ai.metrics import ROWS
from ai.types import VERTEBRAE

log = logging.getLogger(__name__)


@dataclass
class StudyCrops:
    """One study's cached crops.

    ``crops`` is uint8 ``[n_present, S, C, H, W]`` (windowed values x 255), ``present`` bool
    ``[7]``, ``labels`` float32 ``[8]`` in :data:`ai.metrics.ROWS` order, ``slice_labels``
    float32 ``[n_present, S]``: 1 where a fracture box of that vertebra lies within one slice
    of the crop slice, 0 where the vertebra is not fractured or has boxes elsewhere, -1 where
    unknown (a fractured vertebra without boxes). ``box_maps`` is uint8 ``[n_present, S, H,
    W]`` on the crop grid: 1 inside the fracture boxes that count for that slice label, 0
    elsewhere (see :func:`box_maps_from_boxes`); ``None`` in caches made without it.
    """

    uid: str
    crops: torch.Tensor
    present: np.ndarray
    labels: np.ndarray
    reasons: list[str | None]
    slice_labels: np.ndarray | None = None
    box_maps: torch.Tensor | None = None


def cache_key(config: CropConfig, source: str, seg_sha256: str | None) -> str:
    """Folder name under the cache root for one crop setting and crop source."""
    blob = json.dumps(
        {"crop": config.to_dict(), "source": source, "seg": seg_sha256}, sort_keys=True
    )
    return f"{source}-v3-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def close_label_map(label_map: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Morphologically close each vertebra's mask (C1..C7) within its bounding box.

    Fills gaps up to about ``2 * iterations`` voxels (fracture lines); a closed voxel is
    only written where the map is background, so vertebrae never overwrite each other.
    """
    out = np.where(label_map <= 7, label_map, 0).astype(np.uint8)
    objects = ndimage.find_objects(out, max_label=7)
    for n, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        pad = tuple(slice(max(s.start - iterations, 0), s.stop + iterations) for s in sl)
        region = out[pad]
        closed = ndimage.binary_closing(region == n, iterations=iterations)
        region[closed & (region == 0)] = n
    return out


Box = tuple[int, float, float, float, float]
"""``(slice_index, x, y, width, height)`` of one RSNA-style axial fracture box (pixels)."""


def _boxes_by_vertebra(label_map: np.ndarray, boxes: Sequence[Box]) -> dict[int, list[Box]]:
    """Assign each box to the most frequent vertebra label inside it on its slice."""
    per_vertebra: dict[int, list[Box]] = {}
    for box in boxes:
        k, x, y, w, h = box
        region = label_map[k, int(y) : int(np.ceil(y + h)) + 1, int(x) : int(np.ceil(x + w)) + 1]
        vals = region[(region >= 1) & (region <= 7)]
        if vals.size:
            per_vertebra.setdefault(int(np.bincount(vals).argmax()), []).append(box)
    return per_vertebra


def slice_labels_from_boxes(
    batch: CropBatch,
    label_map: np.ndarray,
    labels: np.ndarray,
    boxes: Sequence[Box],
) -> np.ndarray:
    """Per-slice fracture labels of the crops from RSNA-style bounding boxes.

    Parameters
    ----------
    batch
        The crops of one study.
    label_map
        The label map the crops were cut with (assigns each box to a vertebra: the most
        frequent vertebra label inside the box on its slice).
    labels
        ``[8]`` study labels (C1..C7, patient).
    boxes
        ``(slice_index, x, y, width, height)`` per box.

    Returns
    -------
    numpy.ndarray
        float32 ``[n_present, S]`` (see :class:`StudyCrops`).
    """
    n_slices = batch.crops.shape[1]
    out = np.zeros((int(batch.present.sum()), n_slices), np.float32)
    per_vertebra = _boxes_by_vertebra(label_map, boxes)
    for info in batch.vertebrae:
        if not info.assessed or info.index is None:
            continue
        v = VERTEBRAE.index(info.label) + 1
        if labels[v - 1] < 0.5:
            continue
        ks = [b[0] for b in per_vertebra.get(v, [])]
        if not ks:
            out[info.index] = -1.0
            continue
        centres = np.asarray(info.slices)
        near = np.abs(centres[:, None] - np.asarray(ks)[None, :]).min(axis=1) <= 1
        out[info.index] = near.astype(np.float32)
    return out


def box_maps_from_boxes(
    batch: CropBatch,
    label_map: np.ndarray,
    labels: np.ndarray,
    boxes: Sequence[Box],
) -> torch.Tensor:
    """Fracture boxes drawn on the crop grid, one map per crop slice.

    The spatial companion of :func:`slice_labels_from_boxes`: for a crop slice of a
    fractured vertebra, every box of that vertebra within one slice of it is mapped from
    source pixels into the crop (the crop's in-plane box is resized to ``size x size``)
    and filled with 1. Every other map is 0. Training can use the maps as a dense
    auxiliary target ("where is the fracture on this slice").

    Parameters
    ----------
    batch, label_map, labels, boxes
        As :func:`slice_labels_from_boxes`.

    Returns
    -------
    torch.Tensor
        uint8 ``[n_present, S, size, size]``.
    """
    n, n_slices, _, size_h, size_w = batch.crops.shape
    out = torch.zeros((n, n_slices, size_h, size_w), dtype=torch.uint8)
    per_vertebra = _boxes_by_vertebra(label_map, boxes)
    for info in batch.vertebrae:
        if not info.assessed or info.index is None or info.box is None:
            continue
        v = VERTEBRAE.index(info.label) + 1
        if labels[v - 1] < 0.5 or v not in per_vertebra:
            continue
        _z0, _z1, y0, y1, x0, x1 = info.box
        sy, sx = size_h / (y1 - y0), size_w / (x1 - x0)
        for s, centre in enumerate(info.slices):
            for k, x, y, w, h in per_vertebra[v]:
                if abs(k - centre) > 1:
                    continue
                r0 = int(np.clip(np.floor((y - y0) * sy), 0, size_h))
                r1 = int(np.clip(np.ceil((y + h - y0) * sy), 0, size_h))
                c0 = int(np.clip(np.floor((x - x0) * sx), 0, size_w))
                c1 = int(np.clip(np.ceil((x + w - x0) * sx), 0, size_w))
                out[info.index, s, r0:r1, c0:c1] = 1
    return out


def _labels_row(labels: dict[str, int]) -> np.ndarray:
    return np.array([float(labels[r]) for r in ROWS], dtype=np.float32)


def _save(path: Path, item: StudyCrops) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        crops=item.crops.numpy(),
        present=item.present,
        labels=item.labels,
        reasons=np.array(["" if r is None else r for r in item.reasons]),
        slice_labels=item.slice_labels if item.slice_labels is not None else np.zeros(0),
        box_maps=item.box_maps.numpy() if item.box_maps is not None else np.zeros(0, np.uint8),
    )
    tmp.replace(path)


def _load(path: Path, uid: str) -> StudyCrops:
    with np.load(path) as z:
        return StudyCrops(
            uid=uid,
            crops=torch.from_numpy(z["crops"]),
            present=z["present"].astype(bool),
            labels=z["labels"].astype(np.float32),
            reasons=[r or None for r in z["reasons"].tolist()],
            slice_labels=z["slice_labels"]
            if "slice_labels" in z.files and z["slice_labels"].size
            else None,
            box_maps=torch.from_numpy(z["box_maps"])
            if "box_maps" in z.files and z["box_maps"].size
            else None,
        )


def build_crop_cache(
    root: str | Path,
    cache_dir: str | Path,
    config: CropConfig,
    *,
    seg_model: Any = None,
    source: str = "stage1",
    uids: Sequence[str] | None = None,
    progress: Callable[[Any], Any] | None = None,
) -> list[StudyCrops]:
    """Crops of every study of an RSNA-layout dataset, computing and caching missing ones.

    Parameters
    ----------
    root
        Dataset root (``train.csv``, ``train_images/``, ``segmentations/``).
    cache_dir
        Cache root (keep it outside the repository).
    config
        Crop parameters.
    seg_model
        A loaded :class:`ai.seg.SegModel`; required when ``source="stage1"``.
    source
        ``"stage1"`` (predicted label maps) or ``"truth"`` (dataset segmentations).
    uids
        Subset of studies (default: all, in ``train.csv`` order).
    progress
        Optional wrapper for the iteration (e.g. ``tqdm``).

    Returns
    -------
    list of StudyCrops
        In the order of ``uids``; truth-source studies without segmentation are skipped.
    """
    from ai.rsna import RSNADataset

    if source not in ("stage1", "truth"):
        raise ValueError(f"source must be 'stage1' or 'truth', got {source!r}")
    if source == "stage1" and seg_model is None:
        raise ValueError("source='stage1' needs a stage-1 model (seg_model)")
    ds = RSNADataset(root)
    seg_sha = seg_model.identity.sha256 if source == "stage1" else None
    folder = Path(cache_dir) / cache_key(config, source, seg_sha)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = list(uids) if uids is not None else list(ds.study_uids)
    it = progress(wanted) if progress else wanted
    out: list[StudyCrops] = []
    for uid in it:
        path = folder / f"{uid}.npz"
        if path.is_file():
            out.append(_load(path, uid))
            continue
        if source == "truth" and not ds.has_segmentation(uid):
            log.info("skipping study without segmentation (source=truth)")
            continue
        study = ds.load(uid)
        if source == "truth":
            label_map = close_label_map(np.asarray(study.segmentation))
        else:
            label_map = seg_model.predict(study.volume).label_map
        batch = extract_crops(study.volume, label_map, config)
        labels = _labels_row(ds.labels(uid))
        boxes: list[Box] = []
        for b in ds.bounding_boxes(uid):
            try:
                k = study.slice_index(int(float(b["slice_number"])))
            except KeyError:
                continue
            boxes.append((k, float(b["x"]), float(b["y"]), float(b["width"]), float(b["height"])))
        item = StudyCrops(
            uid=uid,
            crops=(batch.crops * 255.0).round_().to(torch.uint8),
            present=batch.present,
            labels=labels,
            reasons=[v.reason for v in batch.vertebrae],
            slice_labels=slice_labels_from_boxes(batch, label_map, labels, boxes),
            box_maps=box_maps_from_boxes(batch, label_map, labels, boxes),
        )
        _save(path, item)
        out.append(item)
    return out
