"""The stage-2 network: ConvNeXt per slice, BiLSTM per vertebra, a patient-level head.

Input is a batch of studies. Only the crops of assessed vertebrae are encoded:
``crops`` is ``[N, S, C, H, W]`` with ``N = present.sum()`` and ``present`` a boolean
``[B, 7]`` telling which vertebra of which study each crop belongs to (row-major order:
study, then C1..C7).

* **Slice encoder:** a 2D ConvNeXt (:mod:`ai.cls.convnext`) on each ``C``-channel slice.
* **Vertebra head:** a 2-layer bidirectional LSTM over the ``S`` slices of a vertebra, a
  linear layer giving one logit per slice, and the vertebra logit = mean of its slice
  logits (the 1st-place RSNA 2022 "type 1" head) or their log-mean-exp (``pooling="lse"``).
* **Patient head** (like the 1st-place "type 2" model): the BiLSTM outputs of all slices
  of all 7 vertebrae, in anatomical order (``7 x S`` steps, zeros for vertebrae that were
  not assessed), go through a second bidirectional LSTM; a masked attention pooling over
  the assessed slices and a linear layer give the patient logit.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
from torch import nn

from ai.cls.convnext import VARIANTS, ConvNeXt

N_VERTEBRAE = 7

_M = TypeVar("_M", bound=nn.Module)


class FractureNet(nn.Module):
    """ConvNeXt + BiLSTM fracture classifier.

    Parameters
    ----------
    variant
        ConvNeXt variant name (``atto`` .. ``tiny``), used when ``depths``/``dims`` are not
        given.
    depths, dims
        Explicit ConvNeXt stage depths and widths (override ``variant``).
    in_chans
        Channels per slice (5 image + 1 mask).
    lstm_hidden
        Hidden size of each LSTM direction.
    drop_path, dropout
        Stochastic depth of the encoder; dropout before the heads.
    layer_scale
        Initial ConvNeXt layer scale.
    encoder_pool
        Spatial pooling of the ConvNeXt features (``"mean"`` or ``"max"``).
    stem
        ConvNeXt stem (``"patch"`` or ``"conv"``, see :class:`ai.cls.convnext.ConvNeXt`).
    pooling
        Slice logits to vertebra logit: ``"mean"`` (1st-place type 1) or ``"lse"``
        (log-mean-exp, a smooth maximum that lets one fractured slice dominate).
    """

    def __init__(
        self,
        variant: str = "atto",
        depths: list[int] | None = None,
        dims: list[int] | None = None,
        in_chans: int = 6,
        lstm_hidden: int = 128,
        drop_path: float = 0.0,
        dropout: float = 0.1,
        layer_scale: float = 1e-6,
        pooling: str = "mean",
        encoder_pool: str = "mean",
        stem: str = "patch",
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "lse"):
            raise ValueError(f"pooling must be 'mean' or 'lse', got {pooling!r}")
        self.pooling = pooling
        if depths is None or dims is None:
            if variant not in VARIANTS:
                raise ValueError(
                    f"unknown ConvNeXt variant {variant!r}; choose from {sorted(VARIANTS)}"
                )
            depths, dims = list(VARIANTS[variant][0]), list(VARIANTS[variant][1])
        self.encoder = ConvNeXt(in_chans, depths, dims, drop_path, layer_scale, encoder_pool, stem)
        h = int(lstm_hidden)
        self.lstm = nn.LSTM(
            self.encoder.out_dim,
            h,
            num_layers=2,
            batch_first=True,
            bidirectional=True,
            dropout=dropout,
        )
        self.drop = nn.Dropout(dropout)
        self.slice_head = nn.Linear(2 * h, 1)
        self.patient_lstm = nn.LSTM(2 * h, h, num_layers=1, batch_first=True, bidirectional=True)
        self.patient_attn = nn.Linear(2 * h, 1)
        self.patient_head = nn.Linear(2 * h, 1)

    def forward(self, crops: torch.Tensor, present: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network.

        Parameters
        ----------
        crops
            ``[N, S, C, H, W]`` crops of the assessed vertebrae.
        present
            Boolean ``[B, 7]``; ``present.sum() == N`` and every study has at least one.

        Returns
        -------
        dict
            ``slice_logits`` ``[N, S]``, ``vertebra_logits`` ``[B, 7]`` (0 where not present)
            and ``patient_logits`` ``[B]``.
        """
        n, s = crops.shape[:2]
        if int(present.sum()) != n:
            raise ValueError(f"present marks {int(present.sum())} vertebrae but {n} crops given")
        x = crops.flatten(0, 1)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.forward_features(self.encoder(x).view(n, s, -1), present)

    def forward_features(
        self, feats: torch.Tensor, present: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run the slice LSTM and the heads on encoder features.

        Parameters
        ----------
        feats
            ``[N, S, D]`` ConvNeXt features of the slices of the assessed vertebrae
            (``D = encoder.out_dim``).
        present
            Boolean ``[B, 7]`` as in :meth:`forward`.

        Returns
        -------
        dict
            As :meth:`forward`.
        """
        n, s = feats.shape[:2]
        if int(present.sum()) != n:
            raise ValueError(f"present marks {int(present.sum())} vertebrae but {n} given")
        seq, _ = self.lstm(feats)
        slice_logits = self.slice_head(self.drop(seq)).squeeze(-1)
        b = present.shape[0]
        vert = slice_logits.new_zeros((b, N_VERTEBRAE))
        if self.pooling == "mean":
            vert[present] = slice_logits.mean(dim=1).to(vert.dtype)
        else:  # smooth maximum; equals the mean when all slices agree
            pooled = torch.logsumexp(slice_logits.float(), dim=1) - math.log(s)
            vert[present] = pooled.to(vert.dtype)
        full = seq.new_zeros((b, N_VERTEBRAE, s, seq.shape[-1]))
        full[present] = seq
        pseq, _ = self.patient_lstm(full.view(b, N_VERTEBRAE * s, -1))
        mask = present.repeat_interleave(s, dim=1)
        scores = self.patient_attn(pseq).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).to(pseq.dtype)
        pooled = (weights.unsqueeze(-1) * pseq).sum(dim=1)
        patient = self.patient_head(self.drop(pooled)).squeeze(-1)
        return {"slice_logits": slice_logits, "vertebra_logits": vert, "patient_logits": patient}


def build(params: dict[str, Any]) -> FractureNet:
    """Build a :class:`FractureNet` from a package's ``architecture.params``."""
    return FractureNet(**params)


def with_memory_format(module: _M, memory_format: torch.memory_format) -> _M:
    """Move ``module``'s 4-D parameters and buffers to ``memory_format`` (in place).

    Parameters
    ----------
    module
        Any module; returned as it came in, for chaining.
    memory_format
        ``torch.channels_last`` on CUDA (faster ConvNeXt convolutions), or
        ``torch.contiguous_format`` before saving weights.

    Returns
    -------
    nn.Module
        ``module`` itself.
    """
    # torch's stubs omit the memory_format keyword that Module.to accepts at run time
    return module.to(memory_format=memory_format)  # type: ignore[call-overload]
