"""A 2D ConvNeXt encoder (Liu et al., "A ConvNet for the 2020s", 2022), written for this project.

timm and torchvision are not available, so the network is defined here. Variants follow
the ConvNeXt family (V1 tiny and the small atto..nano variants popularised with V2):

=========  =============  ===================
variant    depths         dims
=========  =============  ===================
atto       (2, 2, 6, 2)   (40, 80, 160, 320)
femto      (2, 2, 6, 2)   (48, 96, 192, 384)
pico       (2, 2, 6, 2)   (64, 128, 256, 512)
nano       (2, 2, 8, 2)   (80, 160, 320, 640)
tiny       (3, 3, 9, 3)   (96, 192, 384, 768)
=========  =============  ===================

Each block: depthwise 7x7 convolution, LayerNorm over channels (channels-last), an
inverted bottleneck (Linear to 4x, GELU, Linear back), a learnable per-channel layer
scale, optional stochastic depth, and a residual connection. The stem is a 4x4 stride-4
convolution plus LayerNorm; each later stage starts with LayerNorm plus a 2x2 stride-2
convolution. The output is the global average of the last stage followed by a LayerNorm.

``stem="conv"`` replaces the 4x4 patchify stem by a convolutional stem with the same
output stride, in the spirit of "Early convolutions help transformers see better" (Xiao et
al., 2021): dense 3x3 convolutions with BatchNorm and ReLU, two at full resolution
(``stem_width`` channels) and two at half resolution (``2 * stem_width``, the first with
stride 2), then a 2x2 stride-2 convolution to ``dims[0]`` and LayerNorm. A linear 4x4 patch
embedding and depthwise convolutions must find a one-pixel fracture line in few steps; the
dense full-resolution convolutions see it first. Trained from scratch on stage-2 slices,
the slice encoder learned much faster with it (see the project README, stage 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an ``[N, C, H, W]`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """One ConvNeXt block."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # channels-last for norm and MLP
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (x * self.gamma).permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0.0:
            keep = 1.0 - self.drop_path
            mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
            x = x * mask / keep
        return shortcut + x


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor: ``[N, in_chans, H, W]`` -> ``[N, dims[-1]]``.

    Parameters
    ----------
    in_chans
        Input channels.
    depths, dims
        Blocks and channels per stage (4 stages).
    drop_path
        Maximum stochastic-depth rate, increasing linearly over the blocks.
    layer_scale
        Initial value of the per-channel residual scale (1e-6 in the paper; a larger value
        lets the blocks contribute from the start when training from scratch on little data).
    pool
        Spatial pooling of the last stage: ``"mean"`` (the paper's global average) or
        ``"max"`` (global maximum: a small finding, such as a fracture line, is not averaged
        away over the whole crop).
    stem
        ``"patch"`` (the paper's 4x4 stride-4 patchify convolution) or ``"conv"`` (a
        convolutional stem of the same stride; see the module notes).
    stem_width
        Channels of the full-resolution layers of the ``"conv"`` stem.
    """

    def __init__(
        self,
        in_chans: int = 3,
        depths: Sequence[int] = VARIANTS["atto"][0],
        dims: Sequence[int] = VARIANTS["atto"][1],
        drop_path: float = 0.0,
        layer_scale: float = 1e-6,
        pool: str = "mean",
        stem: str = "patch",
        stem_width: int = 32,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.pool = pool
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths {depths} and dims {dims} must be equally long, non-empty")
        self.dims = tuple(int(d) for d in dims)
        """Channels of each stage's output map."""
        self.out_dim = self.dims[-1]
        self.downsample = nn.ModuleList()
        if stem == "patch":
            first: nn.Module = nn.Sequential(
                nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)
            )
        else:
            w = int(stem_width)
            if w < 1:
                raise ValueError(f"stem_width must be >= 1, got {stem_width}")
            layers: list[nn.Module] = []
            for c_in, c_out, stride in (
                (in_chans, w, 1),
                (w, w, 1),
                (w, 2 * w, 2),
                (2 * w, 2 * w, 1),
            ):
                layers += [
                    nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
            layers += [nn.Conv2d(2 * w, dims[0], 2, stride=2), LayerNorm2d(dims[0], eps=1e-6)]
            first = nn.Sequential(*layers)
        self.downsample.append(first)
        for i in range(1, len(dims)):
            self.downsample.append(
                nn.Sequential(
                    LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)
                )
            )
        total = sum(depths)
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        k = 0
        for depth, dim in zip(depths, dims, strict=True):
            self.stages.append(
                nn.Sequential(*[Block(dim, rates[k + j], layer_scale) for j in range(depth)])
            )
            k += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.apply(self._init)
        if stem == "conv":  # ResNet-style init of the convolutions followed by BatchNorm
            for m in self.downsample[0].modules():
                if isinstance(m, nn.Conv2d) and m.bias is None:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of every stage (strides 4, 8, 16, 32 for the four stages).

        Parameters
        ----------
        x
            ``[N, in_chans, H, W]`` input.

        Returns
        -------
        list of torch.Tensor
            ``[N, dims[k], H / 2**(k + 2), W / 2**(k + 2)]`` per stage ``k``.
        """
        maps = []
        for down, stage in zip(self.downsample, self.stages, strict=True):
            x = stage(down(x))
            maps.append(x)
        return maps

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pool the last stage's map ``[N, C, h, w]`` to the normalised feature ``[N, C]``."""
        pooled = x.amax(dim=(2, 3)) if self.pool == "max" else x.mean(dim=(2, 3))
        return self.norm(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_features(self.feature_maps(x)[-1])


def convnext(variant: str = "atto", in_chans: int = 3, drop_path: float = 0.0) -> ConvNeXt:
    """Build a named variant (see the module table)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ConvNeXt variant {variant!r}; choose from {sorted(VARIANTS)}")
    depths, dims = VARIANTS[variant]
    return ConvNeXt(in_chans, depths, dims, drop_path)
