"""The intended-use gate: which inputs each stage accepts, measured on the volume.

Every model package states its intended use in ``model.json`` (``intended_use``), so an
installed model carries its own limits; a site may narrow them in its settings, never
widen them. :func:`check` measures a :class:`~ai.types.CTVolume` against one stage's
limits and returns a :class:`~ai.types.Finding` per limit broken, each naming the
measured value and the limit ("slice thickness 7.0 mm > 1.25 mm"). A stage with a
finding does not assess the study; the caller says so in every output.

The measurements:

* in-plane spacing: the larger of the row and column pixel spacing;
* slice spacing: the step between slice centres along the slice normal;
* slice thickness: the largest nominal SliceThickness of the slices (when known);
* coverage: the craniocaudal extent of the slice centres;
* tilt: the larger of the slice plane's angle to the axial plane (obliquity) and the
  stacking direction's angle to the slice normal (gantry tilt);
* kernel: refused when its name contains one of ``kernel_refused`` (case-insensitive,
  the same substring rule as series selection's kernel patterns); unknown is accepted;
* contrast: ``"any"``, ``"none"`` (refused when the header names an agent) or
  ``"required"`` (refused when it names none); unknown is accepted;
* missing slices (the volume loader's ``gap`` issue) break the slice-spacing limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ai.types import CTVolume, Finding

STAGES = ("stage1", "stage2")
CONTRAST_RULES = ("any", "none", "required")
_RANGES = ("in_plane_spacing_mm", "slice_spacing_mm", "slice_thickness_mm")
_NUMBERS = ("max_tilt_deg", "min_coverage_mm")
SPACING_TOLERANCE = 0.02
"""Relative slack on every limit: header values are rounded (0.625 written as 0.63)."""


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` reads off a volume (``None``: unknown)."""

    in_plane_spacing_mm: float
    slice_spacing_mm: float
    slice_thickness_mm: float | None
    coverage_mm: float
    tilt_deg: float
    kernel: str | None
    contrast_agent: str | None
    missing_slices: bool


def measure(vol: CTVolume) -> Measured:
    """Measure the quantities the gate checks."""
    a = np.asarray(vol.affine, dtype=np.float64)
    step, col, row = a[:3, 0], a[:3, 1], a[:3, 2]
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    normal = normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
    step_len = float(np.linalg.norm(step))
    along = abs(float(step @ normal))
    obliquity = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    shear = math.degrees(math.acos(min(1.0, along / step_len))) if step_len > 0 else 0.0
    n = int(vol.hu.shape[0])
    z = abs(float(step[2])) * max(n - 1, 0)
    return Measured(
        in_plane_spacing_mm=max(float(np.linalg.norm(col)), float(np.linalg.norm(row))),
        slice_spacing_mm=along,
        slice_thickness_mm=vol.facts.slice_thickness,
        coverage_mm=z,
        tilt_deg=max(obliquity, shear),
        kernel=vol.facts.convolution_kernel,
        contrast_agent=vol.facts.contrast_agent,
        missing_slices=any(i.code == "gap" for i in vol.issues),
    )


@dataclass(frozen=True)
class IntendedUse:
    """One stage's input limits (see the module docstring for what each measures).

    Build it with :meth:`from_dict` from a package's ``intended_use``; values are
    validated eagerly and an error names the constraint broken.
    """

    stage: str
    summary: str
    in_plane_spacing_mm: tuple[float, float]
    slice_spacing_mm: tuple[float, float]
    slice_thickness_mm: tuple[float, float]
    max_tilt_deg: float
    min_coverage_mm: float
    kernel_refused: tuple[str, ...] = ()
    contrast: str = "any"
    basis: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], stage: str) -> IntendedUse:
        """Read and validate an ``intended_use`` mapping.

        Raises
        ------
        ValueError
            When a key is missing or a value breaks its constraint.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if not isinstance(data, Mapping):
            raise ValueError("intended_use must be a mapping")
        if data.get("stage", stage) != stage:
            raise ValueError(f"intended_use is for {data.get('stage')!r}, expected {stage!r}")
        kwargs: dict[str, Any] = {"stage": stage, "summary": str(data.get("summary", ""))}
        for key in _RANGES:
            value = data.get(key)
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"intended_use.{key} must be [low, high] in mm, got {value!r}")
            lo, hi = float(value[0]), float(value[1])
            if not 0 <= lo <= hi or not math.isfinite(hi):
                raise ValueError(f"intended_use.{key} must satisfy 0 <= low <= high, got {value}")
            kwargs[key] = (lo, hi)
        for key in _NUMBERS:
            if key not in data:
                raise ValueError(f"intended_use.{key} is required")
            number = float(data[key])
            if not 0 <= number < 1e6:
                raise ValueError(f"intended_use.{key} must be a number >= 0, got {data[key]!r}")
            kwargs[key] = number
        if kwargs["max_tilt_deg"] > 90:
            raise ValueError("intended_use.max_tilt_deg must be at most 90")
        refused = data.get("kernel_refused", [])
        if not isinstance(refused, (list, tuple)) or not all(
            isinstance(p, str) and p for p in refused
        ):
            raise ValueError("intended_use.kernel_refused must be a list of non-empty strings")
        kwargs["kernel_refused"] = tuple(refused)
        contrast = str(data.get("contrast", "any"))
        if contrast not in CONTRAST_RULES:
            raise ValueError(f"intended_use.contrast must be one of {CONTRAST_RULES}")
        kwargs["contrast"] = contrast
        kwargs["basis"] = str(data.get("basis", ""))
        return cls(**kwargs)

    def narrowed(self, overrides: Mapping[str, Any]) -> IntendedUse:
        """These limits with a site's narrower ones applied.

        Raises
        ------
        ValueError
            When an override would widen a limit the package states, or is unknown.
        """
        if not overrides:
            return self
        known = set(_RANGES) | set(_NUMBERS) | {"kernel_refused", "contrast"}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(
                f"unknown intended-use limit(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        changes: dict[str, Any] = {}
        for key in _RANGES:
            if key in overrides:
                lo, hi = (float(v) for v in overrides[key])
                plo, phi = getattr(self, key)
                if lo < plo or hi > phi or lo > hi:
                    raise ValueError(
                        f"{self.stage} {key} [{lo:g}, {hi:g}] would widen the model's "
                        f"[{plo:g}, {phi:g}]; a site may only narrow it"
                    )
                changes[key] = (lo, hi)
        if "max_tilt_deg" in overrides:
            tilt = float(overrides["max_tilt_deg"])
            if tilt > self.max_tilt_deg or tilt < 0:
                raise ValueError(
                    f"{self.stage} max_tilt_deg {tilt:g} would widen the model's "
                    f"{self.max_tilt_deg:g}; a site may only narrow it"
                )
            changes["max_tilt_deg"] = tilt
        if "min_coverage_mm" in overrides:
            coverage = float(overrides["min_coverage_mm"])
            if coverage < self.min_coverage_mm:
                raise ValueError(
                    f"{self.stage} min_coverage_mm {coverage:g} would widen the model's "
                    f"{self.min_coverage_mm:g}; a site may only narrow it"
                )
            changes["min_coverage_mm"] = coverage
        if "kernel_refused" in overrides:
            extra = tuple(str(p) for p in overrides["kernel_refused"])
            changes["kernel_refused"] = self.kernel_refused + tuple(
                p for p in extra if p not in self.kernel_refused
            )
        if "contrast" in overrides:
            contrast = str(overrides["contrast"])
            if contrast not in CONTRAST_RULES or (
                self.contrast != "any" and contrast != self.contrast
            ):
                raise ValueError(
                    f"{self.stage} contrast {contrast!r} would widen the model's "
                    f"{self.contrast!r}; a site may only narrow it"
                )
            changes["contrast"] = contrast
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The limits as ``model.json`` stores them."""
        return {
            "stage": self.stage,
            "summary": self.summary,
            "in_plane_spacing_mm": list(self.in_plane_spacing_mm),
            "slice_spacing_mm": list(self.slice_spacing_mm),
            "slice_thickness_mm": list(self.slice_thickness_mm),
            "max_tilt_deg": self.max_tilt_deg,
            "min_coverage_mm": self.min_coverage_mm,
            "kernel_refused": list(self.kernel_refused),
            "contrast": self.contrast,
            "basis": self.basis,
        }

    def check(self, vol: CTVolume) -> list[Finding]:
        """Findings for every limit ``vol`` breaks (empty: within intended use)."""
        return self.check_measured(measure(vol))

    def check_measured(self, m: Measured) -> list[Finding]:
        """As :meth:`check`, on measurements already taken."""
        out: list[Finding] = []

        def add(check: str, message: str) -> None:
            out.append(Finding("outside_intended_use", self.stage, check, message))

        def in_range(name: str, check: str, value: float, limits: tuple[float, float]) -> None:
            lo, hi = limits
            if value > hi * (1 + SPACING_TOLERANCE):
                add(check, f"{name} {value:.2f} mm > {hi:g} mm")
            elif value < lo * (1 - SPACING_TOLERANCE):
                add(check, f"{name} {value:.2f} mm < {lo:g} mm")

        in_range("in-plane pixel spacing", "in_plane_spacing", m.in_plane_spacing_mm,
                 self.in_plane_spacing_mm)  # fmt: skip
        in_range("slice spacing", "slice_spacing", m.slice_spacing_mm, self.slice_spacing_mm)
        if m.missing_slices:
            add("slice_spacing", "slices missing from the series (uneven gaps)")
        if m.slice_thickness_mm is not None:
            in_range("slice thickness", "slice_thickness", m.slice_thickness_mm,
                     self.slice_thickness_mm)  # fmt: skip
        if m.tilt_deg > self.max_tilt_deg + 0.5:
            add("orientation", f"slices {m.tilt_deg:.1f} deg off axial > {self.max_tilt_deg:g} deg")
        if m.coverage_mm < self.min_coverage_mm:
            add(
                "coverage",
                f"craniocaudal coverage {m.coverage_mm:.0f} mm < {self.min_coverage_mm:g} mm",
            )
        if m.kernel:
            upper = m.kernel.upper()
            hit = next((p for p in self.kernel_refused if p.upper() in upper), None)
            if hit is not None:
                add("kernel", f"reconstruction kernel {m.kernel!r} is a soft-tissue kernel")
        if self.contrast == "none" and m.contrast_agent:
            add("contrast", "contrast-enhanced series (the model expects none)")
        if self.contrast == "required" and m.contrast_agent == "":
            add("contrast", "series without contrast (the model expects contrast)")
        return out


def from_package(meta: Mapping[str, Any], stage: str) -> IntendedUse | None:
    """A package's intended use (``None`` when its ``model.json`` states none)."""
    data = meta.get("intended_use")
    return None if data is None else IntendedUse.from_dict(data, stage)
