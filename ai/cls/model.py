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
from ai.cls.net import FractureNet, build, with_memory_format
from ai.cls.ood import OOD_FILE, Calibration, HeadOutput, OODStats, run_heads
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

    A package with an ``ood`` section abstains on crops unlike its training crops, and
    one with a ``calibration`` section applies its temperatures (see :mod:`ai.cls.ood`);
    without them nothing abstains and the logits are used as trained.
    """

    def __init__(
        self,
        net: FractureNet,
        package: ModelPackage,
        device: torch.device,
        crop_config: CropConfig,
        patient_mode: str = "head",
        ood: OODStats | None = None,
        calibration: Calibration | None = None,
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
        self.ood = ood
        self.calibration = calibration or Calibration()
        if device.type == "cuda":
            self.net = with_memory_format(self.net, torch.channels_last)

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
        try:
            calibration = Calibration.from_meta(package.meta.get("calibration"))
            section = package.meta.get("ood")
            ood_spec = None
            if section:
                ood_spec = (
                    package.path / str(section.get("file", OOD_FILE)),
                    str(section["sha256"]),
                    section.get("threshold"),
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"{package.path}: bad ood/calibration section in model.json: {exc}"
            ) from exc
        ood = OODStats.load(*ood_spec) if ood_spec else None
        dev = select_device(device)
        net = load_module(package, build, dev)
        assert isinstance(net, FractureNet)
        if ood is not None and ood.dim != net.encoder.out_dim:
            raise ModelLoadError(
                f"{package.path}: OOD statistics have {ood.dim} features, the "
                f"encoder gives {net.encoder.out_dim}"
            )
        return cls(net, package, dev, crop_config, patient_mode, ood, calibration)

    @property
    def identity(self) -> ModelIdentity:
        """Identity of the loaded package."""
        return self.package.identity

    @property
    def meta(self) -> dict[str, Any]:
        """The package's ``model.json``."""
        return self.package.meta

    def assess(self, batch: CropBatch) -> tuple[HeadOutput, np.ndarray, dict[str, float | None]]:
        """Run the network on the crops of one volume, with OOD abstention and calibration.

        The encoder runs once; the crops whose OOD score is above the package's threshold
        are dropped and the heads run on the others, so the patient probability uses only
        the vertebrae still assessed.

        Returns
        -------
        tuple
            The logits and OOD scores (:class:`ai.cls.ood.HeadOutput`), ``[7]`` float64
            calibrated vertebra probabilities (NaN where not assessed) and the patient
            probability of each mode (``{"head": ..., "noisy_or": ...}``, ``None`` when no
            vertebra is left).
        """
        present = batch.present
        if not present.any():
            empty = HeadOutput(
                np.full(len(VERTEBRAE), np.nan), None, np.full(len(VERTEBRAE), np.nan),
                np.zeros(len(VERTEBRAE), dtype=bool),
            )  # fmt: skip
            return empty, empty.vertebra_logits.copy(), {m: None for m in PATIENT_MODES}
        crops = batch.crops.to(self.device)
        n, s = crops.shape[:2]
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            x = crops.flatten(0, 1)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            amp = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
            with amp:
                feats = self.net.encoder(x).view(n, s, -1)
        out = run_heads(self.net, feats, present, self.ood, self.device)
        probs, patient = self.calibration.probabilities(out, self.patient_mode)
        kept = out.assessed
        head = patient["head"]
        if not np.all(np.isfinite(probs[kept])) or (head is not None and not np.isfinite(head)):
            raise InferenceError("stage 2 produced non-finite probabilities")
        if self.ood is not None and not np.all(np.isfinite(out.ood_scores[present])):
            raise InferenceError("stage 2 produced non-finite OOD scores")
        return out, probs, patient

    def predict_crops(self, batch: CropBatch) -> tuple[np.ndarray, dict[str, float | None]]:
        """Run the network on the crops of one volume.

        Returns
        -------
        tuple
            ``[7]`` float64 vertebra probabilities (NaN where not assessed, including crops
            that abstained out of distribution) and the patient probability of each mode
            (``{"head": ..., "noisy_or": ...}``, ``None`` when no vertebra was assessed).
        """
        _out, probs, patient = self.assess(batch)
        return probs, patient

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
        out, probs, patient = self.assess(batch)
        t2 = time.perf_counter()
        log.debug(
            "stage2 crops=%.3fs forward=%.3fs assessed=%d abstained=%d",
            t1 - t0,
            t2 - t1,
            int(out.assessed.sum()),
            int(out.abstained.sum()),
        )
        results = []
        thr = self.ood.threshold if self.ood is not None else None
        for i, info in enumerate(batch.vertebrae):
            score = float(out.ood_scores[i]) if np.isfinite(out.ood_scores[i]) else None
            if info.assessed and out.abstained[i] and score is not None and thr is not None:
                results.append(
                    VertebraResult(
                        info.label,
                        True,
                        False,
                        None,
                        f"input unlike the training data (score {score:.1f}, threshold {thr:.1f})",
                        "ood",
                        score,
                    )
                )
            elif info.assessed:
                results.append(
                    VertebraResult(info.label, True, True, float(probs[i]), None, None, score)
                )
            else:
                code = "too_small" if info.visible else "not_in_fov"
                results.append(
                    VertebraResult(info.label, info.visible, False, None, info.reason, code)
                )
        return results, patient[self.patient_mode]
