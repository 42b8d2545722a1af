"""One entry point for both stages: a CT volume in, a :class:`~ai.types.PipelineResult` out.

It knows nothing of DICOM networking or the catalog. Load a :class:`Pipeline` once per
worker process and call :meth:`Pipeline.run` per series, or call the module-level
:func:`run`, which loads the default packages (``seg-demo``, ``cls-demo``) once and caches
them for the life of the process.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ai.cls import ClsModel
from ai.errors import InferenceError
from ai.types import CTVolume, PipelineResult

log = logging.getLogger(__name__)

DEFAULT_SEG = "seg-demo"
DEFAULT_CLS = "cls-demo"


class Pipeline:
    """Stage 1 (segmentation) followed by stage 2 (fracture probabilities)."""

    def __init__(self, seg: Any, cls: ClsModel) -> None:
        self.seg = seg
        self.cls = cls

    @staticmethod
    def load(
        seg: str | Path = DEFAULT_SEG,
        cls: str | Path = DEFAULT_CLS,
        registry: str | Path | None = None,
        device: str = "auto",
    ) -> Pipeline:
        """Load both model packages.

        Parameters
        ----------
        seg
            Stage-1 package folder or name.
        cls
            Stage-2 package folder or name.
        registry
            Folder of installed packages (``None``: the shipped ``ai/models``).
        device
            ``"auto"``, ``"cpu"`` or ``"cuda"``.

        Raises
        ------
        ModelLoadError
            When a package is missing, corrupted or of the wrong kind.
        """
        from ai.seg import SegModel

        seg_model = SegModel.load(seg, registry=registry, device=device)
        cls_model = ClsModel.load(cls, registry=registry, device=device)
        return Pipeline(seg_model, cls_model)

    def run(self, vol: CTVolume) -> PipelineResult:
        """Segment, crop and classify one volume.

        Returns
        -------
        PipelineResult
            Label map on the source grid, C1..C7 verdicts, patient probability, both model
            identities and the seconds spent in ``stage1`` and ``stage2``.

        Raises
        ------
        InferenceError
            When stage 1 returns a label map that does not fit the volume.
        """
        t0 = time.perf_counter()
        seg_out = self.seg.predict(vol)
        t1 = time.perf_counter()
        label_map = np.asarray(seg_out.label_map)
        if label_map.shape != vol.hu.shape:
            raise InferenceError(
                f"stage 1 label map {label_map.shape} does not match volume {vol.hu.shape}"
            )
        verdicts, patient = self.cls.predict(vol, label_map)
        t2 = time.perf_counter()
        log.info(
            "pipeline stage1=%.2fs stage2=%.2fs assessed=%d",
            t1 - t0,
            t2 - t1,
            sum(v.assessed for v in verdicts),
        )
        return PipelineResult(
            label_map=label_map.astype(np.uint8, copy=False),
            vertebrae=verdicts,
            patient_probability=patient,
            models=[self.seg.identity, self.cls.identity],
            timings={"stage1": t1 - t0, "stage2": t2 - t1},
        )


_default: Pipeline | None = None
_lock = threading.Lock()


def default_pipeline() -> Pipeline:
    """The process-wide pipeline with the default packages (loaded on first use)."""
    global _default
    with _lock:
        if _default is None:
            _default = Pipeline.load()
        return _default


def run(volume: CTVolume) -> PipelineResult:
    """Run the default pipeline on a volume (see :func:`default_pipeline`)."""
    return default_pipeline().run(volume)
