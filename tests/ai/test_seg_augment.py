"""Domain randomisation of stage-1 samples: reproducible, bounded, shape-preserving,
and it really changes what a fixed generator would always show."""

from __future__ import annotations

import torch

from ai.seg.augment import DomainRandomisation, domain_randomise


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((3, 1, 32, 32, 32), 0.2)
    y = torch.zeros(3, 7, 32, 32, 32)
    y[:, 3, 10:20, 10:20, 10:20] = 1.0
    x[y.amax(1, keepdim=True) > 0] = 0.8  # bright bone in grey tissue
    return x, y


def test_same_seed_same_result_and_the_targets_are_untouched():
    x, y = _batch()
    y0 = y.clone()
    a = domain_randomise(x, y, torch.Generator().manual_seed(3), DomainRandomisation())
    b = domain_randomise(x, y, torch.Generator().manual_seed(3), DomainRandomisation())
    c = domain_randomise(x, y, torch.Generator().manual_seed(4), DomainRandomisation())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(y, y0) and a.shape == x.shape and torch.isfinite(a).all()


def test_bone_and_soft_tissue_contrast_vary_across_samples_but_bone_stays_brighter_mostly():
    x, y = _batch()
    gen = torch.Generator().manual_seed(0)
    cfg = DomainRandomisation(p=1.0, noise_std=(0.0, 0.0), bias=0.0, max_lowres=1.0)
    bone_means, soft_means = [], []
    for _ in range(20):
        out = domain_randomise(x, y, gen, cfg)
        mask = y.amax(1, keepdim=True) > 0
        for n in range(out.shape[0]):
            bone_means.append(out[n][mask[n]].mean().item())
            soft_means.append(out[n][~mask[n]].mean().item())
    bone, soft = torch.tensor(bone_means), torch.tensor(soft_means)
    assert bone.std() > 0.05 and soft.std() > 0.03  # no fixed intensity to learn
    assert (bone > soft).float().mean() > 0.9  # bone is still bone


def test_p_zero_changes_nothing():
    x, y = _batch()
    out = domain_randomise(x, y, torch.Generator().manual_seed(1), DomainRandomisation(p=0.0))
    assert torch.equal(out, x)
