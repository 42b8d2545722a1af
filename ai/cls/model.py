"""Stage-2 inference: :class:`ClsModel` turns a volume plus its label map into verdicts."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai.cls.crops import CropBatch, CropConfig, extract_crops
from ai.cls.net import FractureNet, build
from ai.errors import InferenceError, ModelLoadError
from ai.modelpkg import ModelPackage, load_module, read_package, resolve_package, select_device
from ai.types import VERTEBRAE, CTVolume, ModelIdentity, VertebraResult

log = logging.getLogger(__name__)

ARCHITECTURE_CLASS = "ai.cls.net.FractureNet"
PATIENT_MODES = ("head", "noisy_or")
"""``head``: the learned patient head; ``noisy_or``: ``1 - prod(1 - p_v)`` (assessed only)."""


def noisy_or(probs: np.ndarray) -> float:
    """Probability that at least one vertebra is fractured, assuming independence."""
    p = np.asarray(probs, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - p))


class ClsModel:
    """A loaded stage-2 classifier.

    Load once per process with :meth:`load`; :meth:`predict` is then safe to call
    repeatedly (inference mode, no state kept between calls).
    """

    def __init__(
        self,
        net: FractureNet,
        package: ModelPackage,
        device: torch.device,
        crop_config: CropConfig,
        patient_mode: str = "head",
    ) -> None:
        if patient_mode not in PATIENT_MODES:
            raise ModelLoadError(
                f"patient_mode must be one of {PATIENT_MODES}, got {patient_mode!r}"
            )
        self.net = net
        self.package = package
        self.device = device
        self.crop_config = crop_config
        self.patient_mode = patient_mode
        if device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)

    @classmethod
    def load(
        cls,
        package_path_or_name: str | Path,
        registry: str | Path | None = None,
        device: str = "auto",
    ) -> ClsModel:
        """Load and verify a stage-2 package.

        Parameters
        ----------
        package_path_or_name
            Package folder or name in the registry (e.g. ``"cls-demo"``).
        registry
            Folder of installed packages (``None``: the shipped ``ai/models``).
        device
            ``"auto"``, ``"cpu"`` or ``"cuda"``.

        Raises
        ------
        ModelLoadError
            When the package is missing, corrupted or not a stage-2 package.
        """
        package = read_package(resolve_package(package_path_or_name, registry))
        if package.meta.get("task") != "cls":
            raise ModelLoadError(
                f"{package.path} is a {package.meta.get('task')!r} package, expected task 'cls'"
            )
        if package.architecture.get("class") != ARCHITECTURE_CLASS:
            raise ModelLoadError(
                f"{package.path}: unsupported architecture {package.architecture.get('class')!r}"
            )
        try:
            crop_config = CropConfig.from_dict(package.meta["input"]["crop"])
            patient_mode = str(package.meta.get("inference", {}).get("patient_mode", "head"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{package.path}: bad input spec in model.json: {exc}") from exc
        dev = select_device(device)
        net = load_module(package, build, dev)
        assert isinstance(net, FractureNet)
        return cls(net, package, dev, crop_config, patient_mode)

    @property
    def identity(self) -> ModelIdentity:
        """Identity of the loaded package."""
        return self.package.identity

    @property
    def meta(self) -> dict[str, Any]:
        """The package's ``model.json``."""
        return self.package.meta

    def predict_crops(self, batch: CropBatch) -> tuple[np.ndarray, dict[str, float | None]]:
        """Run the network on the crops of one volume.

        Returns
        -------
        tuple
            ``[7]`` float64 vertebra probabilities (NaN where not assessed) and the patient
            probability of each mode (``{"head": ..., "noisy_or": ...}``, ``None`` when no
            vertebra was assessed).
        """
        present = batch.present
        probs = np.full(len(VERTEBRAE), np.nan)
        if not present.any():
            return probs, {m: None for m in PATIENT_MODES}
        crops = batch.crops.to(self.device)
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            amp = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
            with amp:
                out = self.net(crops, torch.from_numpy(present)[None].to(self.device))
        v = torch.sigmoid(out["vertebra_logits"].float())[0].cpu().numpy().astype(np.float64)
        probs[present] = v[present]
        head = float(torch.sigmoid(out["patient_logits"].float())[0])
        if not np.all(np.isfinite(probs[present])) or not np.isfinite(head):
            raise InferenceError("stage 2 produced non-finite probabilities")
        return probs, {"head": head, "noisy_or": noisy_or(probs[present])}

    def predict(
        self, vol: CTVolume, label_map: np.ndarray
    ) -> tuple[list[VertebraResult], float | None]:
        """Fracture probability per vertebra and for the patient.

        Parameters
        ----------
        vol
            The CT volume.
        label_map
            Stage-1 labels on the volume's grid (1..7 = C1..C7).

        Returns
        -------
        tuple
            One :class:`VertebraResult` per C1..C7 (``probability`` is ``None`` exactly when
            not assessed, with the reason) and the patient probability (``None`` when no
            vertebra could be assessed).
        """
        t0 = time.perf_counter()
        batch = extract_crops(vol, label_map, self.crop_config)
        t1 = time.perf_counter()
        probs, patient = self.predict_crops(batch)
        t2 = time.perf_counter()
        log.debug(
            "stage2 crops=%.3fs forward=%.3fs assessed=%d",
            t1 - t0,
            t2 - t1,
            int(batch.present.sum()),
        )
        results = []
        for i, info in enumerate(batch.vertebrae):
            if info.assessed:
                results.append(VertebraResult(info.label, True, True, float(probs[i]), None))
            else:
                code = "too_small" if info.visible else "not_in_fov"
                results.append(
                    VertebraResult(info.label, info.visible, False, None, info.reason, code)
                )
        return results, patient[self.patient_mode]
