"""Imaging chain of generator v2: point-spread blur, CT-like correlated noise, metal streaks.

Noise is white noise shaped in the Fourier domain by a noise power spectrum of the usual
filtered-back-projection form, ``NPS(f) ~ f * A(f)^2`` (a ramp times the kernel's
apodisation window; Boedeker et al., Med Phys 2007 "Application of the noise power
spectrum in modern diagnostic MDCT"): a bone (sharp) kernel keeps high frequencies and
gives fine grain, a soft-tissue kernel gives blotchy low-frequency grain. A small bank of
noise images is drawn once per study and shifted per slice.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

F32 = np.float32

KERNELS: dict[str, dict[str, float]] = {
    "bone": {"fc": 0.42, "psf_mm": 0.35},
    "soft": {"fc": 0.18, "psf_mm": 0.75},
}
"""Kernel families: apodisation cut-off (cycles per pixel) and in-plane PSF sigma (mm)."""


def noise_bank(
    rng: np.random.Generator, shape: tuple[int, int], kernel: str, n: int = 6
) -> np.ndarray:
    """``n`` float32 noise images with unit standard deviation and the kernel's NPS."""
    rows, cols = shape
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    fc = KERNELS[kernel]["fc"]
    filt = np.sqrt(f * np.exp(-((f / fc) ** 2))).astype(F32)
    white = rng.standard_normal((n, rows, cols), dtype=F32)
    shaped = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(rows, cols)).astype(F32)
    shaped /= shaped.std(axis=(1, 2), keepdims=True) + F32(1e-6)
    return shaped


def add_noise(hu: np.ndarray, rng: np.random.Generator, sigma: np.ndarray, kernel: str) -> None:
    """Add correlated noise in place; ``sigma`` is the standard deviation per slice."""
    S, R, C = hu.shape
    m = 24
    bank = noise_bank(rng, (R + m, C + m), kernel)
    picks: np.ndarray = rng.integers(0, int(bank.shape[0]), size=(S,))
    offs: np.ndarray = rng.integers(0, m, size=(S, 2))
    for k in range(S):
        oy, ox = int(offs[k, 0]), int(offs[k, 1])
        hu[k] += F32(sigma[k]) * bank[int(picks[k]), oy : oy + R, ox : ox + C]


def blur(hu: np.ndarray, dx: float, dz: float, kernel: str, thickness: float) -> None:
    """Point-spread blur in place: in-plane from the kernel, along z from the thickness."""
    s_xy = KERNELS[kernel]["psf_mm"] / dx
    s_z = max(0.0, thickness - dz) / 2.355 / dz if thickness > dz else 0.0
    if s_xy > 0.15:
        ndimage.gaussian_filter(hu, sigma=(0.0, s_xy, s_xy), output=hu, truncate=2.5)
    if s_z > 0.2:
        ndimage.gaussian_filter1d(hu, sigma=s_z, axis=0, output=hu, truncate=2.5)


def metal_streaks(
    img: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    centres: list[tuple[float, float]],
    rng: np.random.Generator,
    strength: float,
) -> None:
    """Dark and bright streaks radiating from metal (dental fillings) on one slice."""
    X = xs.astype(F32)[None, :]
    Y = ys.astype(F32)[:, None]
    for cx, cy in centres:
        for _ in range(int(rng.integers(6, 12))):
            a = rng.uniform(0, math.pi)
            nx, ny = F32(-math.sin(a)), F32(math.cos(a))
            dist = np.abs((X - F32(cx)) * nx + (Y - F32(cy)) * ny)
            along = np.hypot(X - F32(cx), Y - F32(cy)) + F32(5.0)
            amp = F32(strength * rng.choice([-1.0, 0.6]) * rng.uniform(0.4, 1.0))
            img += amp * np.exp(-dist / F32(1.2)) * (F32(25.0) / along)
