"""Stage-1 model: network construction, :class:`SegModel` inference and post-processing."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ai.errors import InferenceError, ModelLoadError
from ai.modelpkg import ModelPackage, load_module, read_package, resolve_package, select_device
from ai.seg.preprocess import (
    Box,
    Canon,
    InputSpec,
    canonical_view,
    iter_source_slabs,
    prepare_input,
    roi_from_mask,
)
from ai.types import VERTEBRAE, CTVolume, ModelIdentity

logger = logging.getLogger(__name__)

ARCH_CLASS = "monai.networks.nets.FlexibleUNet"
N_LABELS = len(VERTEBRAE)
DEFAULT_PACKAGE = "seg-demo"
_POST_SLAB = 16
"""Slices of a label's box handled at once by the post-processing."""


def default_arch_params(
    backbone: str = "efficientnet-b0", decoder_channels: tuple[int, ...] = (64, 32, 16, 8, 4)
) -> dict[str, Any]:
    """Architecture parameters of the stage-1 network (``model.json["architecture"]["params"]``)."""
    return {
        "in_channels": 1,
        "out_channels": N_LABELS,
        "backbone": backbone,
        "pretrained": False,
        "spatial_dims": 3,
        "decoder_channels": list(decoder_channels),
    }


def build_network(params: dict[str, Any]) -> torch.nn.Module:
    """Build an untrained MONAI ``FlexibleUNet`` from architecture parameters.

    Raises
    ------
    ValueError
        When the parameters do not describe a 3-D, 1-in, 7-out network without
        downloaded weights.
    """
    from monai.networks.nets import FlexibleUNet

    p = dict(params)
    if int(p.get("spatial_dims", 3)) != 3:
        raise ValueError(f"stage-1 network must have spatial_dims=3, got {p.get('spatial_dims')}")
    if int(p.get("out_channels", -1)) != N_LABELS:
        raise ValueError(
            f"stage-1 network must have out_channels={N_LABELS} (C1..C7), "
            f"got {p.get('out_channels')}"
        )
    if p.get("pretrained"):
        raise ValueError("pretrained=True would download weights at run time; it is not allowed")
    if "decoder_channels" in p:
        p["decoder_channels"] = tuple(int(c) for c in p["decoder_channels"])
    return FlexibleUNet(**p)


@dataclass
class SegOutput:
    """Result of :meth:`SegModel.predict`.

    Attributes
    ----------
    label_map
        uint8 array on the source grid, 0 background, 1..7 = C1..C7.
    visible
        ``{"C1": bool, ...}``: whether each vertebra is in the field of view.
    seconds
        Wall time of preprocessing, inference, resampling and post-processing.
    volumes_mm3
        Segmented volume of each vertebra in mm³.
    notes
        Post-processing remarks (e.g. a label order that had to be reversed).
    """

    label_map: np.ndarray
    visible: dict[str, bool]
    seconds: float
    volumes_mm3: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PostSpec:
    """Post-processing parameters (``model.json["postprocess"]``).

    Attributes
    ----------
    threshold
        A source voxel gets the label of its most probable channel when that
        probability exceeds this (also the spine-region threshold of a two-pass model).
    min_visible_mm3
        A vertebra with less segmented volume is "not in the field of view".
    bone_hu
        Bone refinement on the source grid (``None``: off). The network works on a
        coarse grid whose voxels are several source voxels wide, so its upsampled
        boundary cannot follow the bone surface. With refinement a source voxel is
        labelled when its best probability exceeds ``region_threshold`` (a wider
        region than ``threshold``) *and* its HU is at least ``bone_hu``: the label
        comes from the network, the boundary from the image.
    region_threshold
        Probability defining the candidate region when ``bone_hu`` is set.
    fill_holes
        With refinement, fill holes that a label encloses completely in 3-D (marrow
        below ``bone_hu`` inside the cortical shell, as in osteoporotic bone).
    """

    threshold: float = 0.5
    min_visible_mm3: float = 500.0
    bone_hu: float | None = None
    region_threshold: float = 0.05
    fill_holes: bool = True

    def __post_init__(self) -> None:
        for name in ("threshold", "region_threshold"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"postprocess {name} must be within (0, 1), got {value}")
        if self.bone_hu is not None and not -1024.0 <= self.bone_hu <= 3071.0:
            raise ValueError(f"postprocess bone_hu must be within -1024..3071, got {self.bone_hu}")

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "threshold": self.threshold,
            "min_visible_mm3": self.min_visible_mm3,
            "bone_hu": self.bone_hu,
            "region_threshold": self.region_threshold,
            "fill_holes": self.fill_holes,
        }


_Boxes = list[tuple[slice, ...] | None]


def _boxes(label_map: np.ndarray) -> _Boxes:
    return ndimage.find_objects(label_map, max_label=N_LABELS)


def keep_largest_components(label_map: np.ndarray, boxes: _Boxes | None = None) -> None:
    """Keep only the largest 26-connected component of every label, in place.

    Works inside each label's bounding box; the component sizes are counted and the
    small components cleared slab by slab, so besides the box's int32 component map
    only slab-sized temporaries exist (a whole-box ``bincount`` would first cast the
    component map to int64, 8 bytes per voxel). ``boxes`` (from :func:`_boxes`, or boxes
    that contain them) saves a pass over the whole volume.
    """
    structure = np.ones((3, 3, 3), dtype=bool)
    for value, box in enumerate(_boxes(label_map) if boxes is None else boxes, start=1):
        if box is None:
            continue
        sub = label_map[box]
        comps, n = ndimage.label(sub == value, structure=structure)
        if n <= 1:
            continue
        sizes = np.zeros(n + 1, dtype=np.int64)
        for start in range(0, comps.shape[0], _POST_SLAB):
            sizes += np.bincount(comps[start : start + _POST_SLAB].ravel(), minlength=n + 1)
        sizes[0] = 0
        keep = int(np.argmax(sizes))
        for start in range(0, comps.shape[0], _POST_SLAB):
            part = comps[start : start + _POST_SLAB]
            sub[start : start + _POST_SLAB][(part != 0) & (part != keep)] = 0
        del comps


def fill_enclosed_holes(label_map: np.ndarray, boxes: _Boxes | None = None) -> None:
    """Give every background hole that a label encloses completely (in 3-D) that label.

    Works inside each label's bounding box, in place; a hole touching another label or
    the box's border is not enclosed and stays background.
    """
    for value, box in enumerate(_boxes(label_map) if boxes is None else boxes, start=1):
        if box is None:
            continue
        sub = label_map[box]
        # components of "not this label" (6-connected, as binary_fill_holes) that do not
        # touch the box's faces are enclosed; one labelling pass instead of the iterated
        # dilation of binary_fill_holes (3x faster on a vertebra's box)
        comps, n = ndimage.label(sub != value)
        if n == 0:
            continue
        enclosed = np.ones(n + 1, dtype=bool)
        enclosed[0] = False
        for axis in range(3):
            for end in (0, -1):
                enclosed[np.take(comps, end, axis=axis)] = False
        holes = enclosed[comps]
        del comps
        holes &= sub == 0
        sub[holes] = value


def label_counts(label_map: np.ndarray, boxes: _Boxes | None = None) -> dict[int, int]:
    """Voxel count of each label 1..7 (computed inside bounding boxes, or ``boxes``)."""
    counts = {}
    for value, box in enumerate(_boxes(label_map) if boxes is None else boxes, start=1):
        counts[value] = 0 if box is None else int(np.count_nonzero(label_map[box] == value))
    return counts


def _centroid(label_map: np.ndarray, value: int, box: tuple[slice, ...]) -> np.ndarray:
    local = ndimage.center_of_mass(label_map[box] == value)
    return np.array([b.start + c for b, c in zip(box, local, strict=True)], dtype=float)


def enforce_cranio_caudal_order(
    label_map: np.ndarray,
    affine: np.ndarray,
    boxes: _Boxes | None = None,
    min_voxels: int = 0,
) -> list[str]:
    """Make C1 lie above C7 along the patient (superior) axis.

    Compares the superior (LPS z) coordinates of the centroids of every pair of present
    labels: a pair is in order when the lower number (nearer C1) lies above. Only when
    more pairs are out of order than in order are the labels reversed (n -> 8 - n) in
    place (the boxes of the new labels are then ``boxes[::-1]``), so one misplaced speck
    cannot flip a whole spine. Labels smaller than ``min_voxels`` (specks that will not
    count as visible) take part only when fewer than two labels are larger. Returns
    notes describing what was done.
    """
    boxes = _boxes(label_map) if boxes is None else boxes
    present = [v for v, box in enumerate(boxes, start=1) if box is not None]
    if min_voxels > 0:
        counts = label_counts(label_map, boxes)
        large = [v for v in present if counts[v] >= min_voxels]
        if len(large) >= 2:
            present = large
    if len(present) < 2:
        return []
    z = {}
    for v in present:
        idx = _centroid(label_map, v, boxes[v - 1])  # type: ignore[arg-type]
        z[v] = float((affine @ np.append(idx, 1.0))[2])
    in_order = sum(z[a] > z[b] for i, a in enumerate(present) for b in present[i + 1 :])
    out_of_order = sum(z[a] < z[b] for i, a in enumerate(present) for b in present[i + 1 :])
    if out_of_order <= in_order:
        return []
    lo, hi = present[0], present[-1]
    lut = np.arange(256, dtype=np.uint8)
    lut[1 : N_LABELS + 1] = np.arange(N_LABELS, 0, -1, dtype=np.uint8)
    # only inside the union of the label boxes: nothing outside it changes
    known = [b for b in boxes if b is not None]
    union = tuple(
        slice(min(b[a].start for b in known), max(b[a].stop for b in known)) for a in range(3)
    )
    region = label_map[union]
    for start in range(0, region.shape[0], 16):
        region[start : start + 16] = lut[region[start : start + 16]]
    note = (
        f"labels reversed: {out_of_order} of {in_order + out_of_order} label pairs had the "
        f"lower number below ({VERTEBRAE[lo - 1]} .. {VERTEBRAE[hi - 1]})"
    )
    logger.warning("stage-1 post-processing %s", note)
    return [note]


def labels_from_logits(
    vol: CTVolume,
    logits: torch.Tensor,
    canon: Canon,
    roi: Box,
    post: PostSpec,
) -> SegOutput:
    """Map working-grid logits onto the source grid and post-process them.

    Parameters
    ----------
    vol
        The source volume (its HU values are used by the bone refinement).
    logits
        ``(7, d, h, w)`` network output over ``roi``.
    canon, roi
        The canonical transform and region the logits were computed for
        (from :func:`ai.seg.preprocess.prepare_input`).
    post
        The post-processing.

    Returns
    -------
    SegOutput
        With ``seconds`` 0 (the caller times the whole prediction).
    """
    label_map = np.zeros(vol.hu.shape, dtype=np.uint8)
    view = canonical_view(label_map, canon)
    hu_view = canonical_view(vol.hu, canon)
    _z0, _z1, y0, y1, x0, x1 = roi
    bone_hu = post.bone_hu
    thr = post.region_threshold if bone_hu is not None else post.threshold
    for start, probs in iter_source_slabs(logits, roi):
        best, arg = probs.max(dim=0)
        keep = best > thr
        if bone_hu is not None:
            hu = torch.from_numpy(
                np.ascontiguousarray(hu_view[start : start + keep.shape[0], y0:y1, x0:x1])
            )
            keep &= hu >= bone_hu
        lab = torch.where(keep, arg + 1, 0).to(torch.uint8).numpy()
        view[start : start + lab.shape[0], y0:y1, x0:x1] = lab
    # one pass over the whole volume for the label boxes; each step below works
    # inside them (they stay valid supersets as components are cleared)
    boxes = _boxes(label_map)
    keep_largest_components(label_map, boxes)
    voxel_mm3 = float(abs(np.linalg.det(vol.affine[:3, :3])))
    min_voxels = math.ceil(post.min_visible_mm3 / voxel_mm3) if voxel_mm3 > 0 else 0
    notes = enforce_cranio_caudal_order(label_map, vol.affine, boxes, min_voxels)
    if notes:  # labels n -> 8 - n
        boxes = boxes[::-1]
    if bone_hu is not None and post.fill_holes:
        fill_enclosed_holes(label_map, boxes)
    counts = label_counts(label_map, boxes)
    volumes = {name: counts[i] * voxel_mm3 for i, name in enumerate(VERTEBRAE, start=1)}
    visible = {name: volumes[name] >= post.min_visible_mm3 for name in VERTEBRAE}
    for i, name in enumerate(VERTEBRAE, start=1):
        box = boxes[i - 1]
        if not visible[name] and box is not None:  # too small to count: drop the specks
            sub = label_map[box]
            sub[sub == i] = 0
    return SegOutput(
        label_map=label_map, visible=visible, seconds=0.0, volumes_mm3=volumes, notes=notes
    )


class SegModel:
    """A loaded stage-1 segmentation model. Load once per process, then call :meth:`predict`."""

    def __init__(
        self, package: ModelPackage, network: torch.nn.Module, device: torch.device
    ) -> None:
        self.package = package
        self.network = network
        self.device = device
        try:
            self.input_spec = InputSpec.from_json(package.meta["input"])
            self.post = PostSpec(**package.meta.get("postprocess", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{package.path}: invalid input/postprocess spec: {exc}") from exc

    @classmethod
    def load(
        cls,
        package: str | Path = DEFAULT_PACKAGE,
        registry: str | Path | None = None,
        device: str = "auto",
    ) -> SegModel:
        """Load and verify a stage-1 package.

        Parameters
        ----------
        package
            Package folder or name in the registry (default ``seg-demo``).
        registry
            Folder of installed packages; ``None`` uses the packages shipped in ``ai/models``.
        device
            ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

        Raises
        ------
        ModelLoadError
            Missing package, sha256 mismatch, a task other than ``seg`` or architecture
            parameters that do not fit the weights.
        """
        pkg = read_package(resolve_package(package, registry))
        if pkg.meta.get("task") != "seg":
            raise ModelLoadError(f"{pkg.path} is a {pkg.meta.get('task')!r} model, not 'seg'")
        if pkg.architecture.get("class") != ARCH_CLASS:
            raise ModelLoadError(
                f"{pkg.path}: architecture class must be {ARCH_CLASS}, "
                f"got {pkg.architecture.get('class')}"
            )
        dev = select_device(device)
        net = load_module(pkg, build_network, dev)
        return cls(pkg, net, dev)

    @property
    def identity(self) -> ModelIdentity:
        """Identity of the package, for outputs."""
        return self.package.identity

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on an input ``(1, 1, d, h, w)``; returns ``(7, d, h, w)`` on CPU."""
        with torch.inference_mode():
            x = x.to(self.device)
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = self.network(x)
            else:
                out = self.network(x)
        return out[0].float().cpu()

    def predict(self, vol: CTVolume) -> SegOutput:
        """Segment C1..C7 in a volume and map the labels onto its own grid.

        Raises
        ------
        InferenceError
            When the volume is empty or the network fails.
        """
        t0 = time.perf_counter()
        if vol.hu.ndim != 3 or vol.hu.size == 0:
            raise InferenceError(f"volume must be a non-empty 3-D array, got shape {vol.hu.shape}")
        spec = self.input_spec
        try:
            x, canon, roi = prepare_input(vol.hu, vol.affine, spec)
            logits = self.logits(x)
            if spec.two_pass:
                found = (torch.sigmoid(logits).amax(dim=0) > self.post.threshold).numpy()
                shape = canonical_view(vol.hu, canon).shape
                roi2 = roi_from_mask(found, roi, shape, canon.spacing, spec.roi_margin_mm)
                if roi2 is not None:
                    x, canon, roi = prepare_input(vol.hu, vol.affine, spec, roi=roi2)
                    logits = self.logits(x)
                else:
                    logits = torch.full_like(logits, -20.0)  # nothing found in pass 1
        except RuntimeError as exc:
            raise InferenceError(f"stage-1 network failed: {exc}") from exc
        out = labels_from_logits(vol, logits, canon, roi, self.post)
        seconds = time.perf_counter() - t0
        out.seconds = seconds
        logger.info(
            "stage-1 done seconds=%.2f visible=%s",
            seconds,
            ",".join(k for k, v in out.visible.items() if v),
        )
        return out
