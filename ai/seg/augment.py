"""Domain randomisation of stage-1 training samples (after SynthSeg, Billot et al.,
Medical Image Analysis 2023).

A network trained on one generator learns that generator's intensities, noise and
sharpness. Randomising them on the fly, sample by sample, leaves shape as the only
stable cue. Everything here acts on the working grid the network sees (the
``bone_window`` input in [0, 1], ``(B, 1, d, h, w)``) with the vertebra targets
``(B, 7, d, h, w)``, and draws from one :class:`torch.Generator` so a run is
reproducible:

* **per-tissue contrast**: bone (inside the union of the targets) and the rest get
  their own random gain and offset, so "bone is this bright" stops being a cue;
* **bias field**: a smooth multiplicative field (a 4x4x4 random grid, upsampled);
* **resolution**: down-sampling along one random axis by up to ``max_lowres`` and back
  (thick slices, soft kernels), then a random Gaussian blur;
* **gamma**: ``x ** exp(N(0, sigma))`` on the clipped [0, 1] window;
* **noise**: white or spatially correlated (blurred) Gaussian noise, as CT noise
  power spectra of bone and soft-tissue kernels differ.

Flips are not here: :func:`ai.seg.train.augment` does the left-right flip (the only one
anatomy allows; cranio-caudal and antero-posterior order carry the labels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F  # noqa: N812


@dataclass(frozen=True)
class DomainRandomisation:
    """Ranges of the randomisation (recorded in ``model.json``)."""

    p: float = 0.8
    """Probability that a sample is randomised at all."""
    bone_gain: tuple[float, float] = (0.6, 1.4)
    other_gain: tuple[float, float] = (0.6, 1.4)
    offset: tuple[float, float] = (-0.1, 0.1)
    bias: float = 0.3
    """Largest log-amplitude of the bias field."""
    max_lowres: float = 3.0
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    gamma_sigma: float = 0.3
    noise_std: tuple[float, float] = (0.0, 0.08)
    correlated_noise_p: float = 0.5

    def to_json(self) -> dict[str, object]:
        """Plain-JSON form."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _u(lo: float, hi: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, d, h, w)`` with one sigma (voxels)."""
    if sigma < 0.2:
        return x
    r = max(1, round(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


def domain_randomise(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, cfg: DomainRandomisation
) -> torch.Tensor:
    """Randomised images for a batch; the targets ``y`` are only read (bone mask).

    Parameters
    ----------
    x
        ``(B, 1, d, h, w)`` inputs in the [0, 1] bone window.
    y
        ``(B, 7, d, h, w)`` soft targets.
    """
    out = x.clone()
    bone = y.amax(dim=1, keepdim=True).clamp(0, 1)
    b = x.shape[0]
    for n in range(b):
        if torch.rand(1, generator=gen).item() >= cfg.p:
            continue
        xi, mi = out[n : n + 1], bone[n : n + 1]
        gb = _u(*cfg.bone_gain, 1, gen).item()
        go = _u(*cfg.other_gain, 1, gen).item()
        off = _u(*cfg.offset, 1, gen).item()
        xi = xi * (gb * mi + go * (1 - mi)) + off
        coarse = (2 * torch.rand((1, 1, 4, 4, 4), generator=gen) - 1) * cfg.bias
        field = F.interpolate(coarse, size=xi.shape[2:], mode="trilinear", align_corners=False)
        xi = xi * torch.exp(field)
        factor = _u(1.0, cfg.max_lowres, 1, gen).item()
        if factor > 1.2:
            axis = int(torch.randint(0, 3, (1,), generator=gen).item())
            size = list(xi.shape[2:])
            small = list(size)
            small[axis] = max(4, round(size[axis] / factor))
            xi = F.interpolate(xi, size=small, mode="area")
            xi = F.interpolate(xi, size=size, mode="trilinear", align_corners=False)
        xi = _gauss_blur(xi, _u(*cfg.blur_sigma, 1, gen).item())
        gamma = float(torch.exp(torch.randn(1, generator=gen) * cfg.gamma_sigma).item())
        xi = xi.clamp(0, 1) ** gamma
        std = _u(*cfg.noise_std, 1, gen).item()
        noise = torch.randn(xi.shape, generator=gen)
        if torch.rand(1, generator=gen).item() < cfg.correlated_noise_p:
            noise = _gauss_blur(noise, 1.0)
            noise = noise / noise.std().clamp_min(1e-6)
        out[n : n + 1] = xi + std * noise
    return out
