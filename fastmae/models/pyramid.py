"""ViTDet's simple feature pyramid: multi-scale maps from the one stride-p map of a plain ViT.

Shapes: B batch, D width, h, w patch grid, C out_channels. Each scale s (a power of two) gives a map of
(B, C, round(h*s), round(w*s)) for s >= 1 and (B, C, h // (1/s), w // (1/s)) for s < 1 (max pooling floors):
  s > 1: log2(s) deconvolutions (ConvTranspose2d 2x2 stride 2), each halving the width, with norm + GELU
         between them (ViTDet: 4x = deconv, norm, GELU, deconv; 2x = deconv);
  s = 1: the map itself;
  s < 1: log2(1/s) max poolings (2x2 stride 2);
then a 1x1 conv to C channels + norm and a 3x3 conv + norm. With ViT-B/16 on 1024 px images the scales
(4, 2, 1, 0.5) are ViTDet's strides 4/8/16/32; with patch 4 on 28-84 px images they are just relative
scales x4, x2, x1, x0.5 of the patch grid (strides 1/2/4/8 pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (ViTDet's 'LN' for convolutions)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)  # (B, H, W, C)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


def _log2_scale(scale: float) -> int:
    """log2 of a scale that must be a power of two (0.25, 0.5, 1, 2, 4, ...)."""
    k = math.log2(scale) if scale > 0 else float("nan")
    if not math.isfinite(k) or k != round(k):
        raise ValueError(f"pyramid scales must be powers of two (e.g. 4, 2, 1, 0.5), got {scale}")
    return int(round(k))


def _resample(dim: int, k: int) -> tuple[nn.Module, int]:
    """The layers that scale a (B, dim, h, w) map by 2^k, and the width they output."""
    if k == 0:
        return nn.Identity(), dim
    if k < 0:
        return nn.Sequential(*[nn.MaxPool2d(2, 2) for _ in range(-k)]), dim
    layers: list[nn.Module] = []
    width = dim
    for i in range(k):
        if i:
            layers += [LayerNorm2d(width), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, max(width // 2, 1), 2, stride=2))
        width = max(width // 2, 1)
    return nn.Sequential(*layers), width


class SimpleFeaturePyramid(nn.Module):
    """(B, D, h, w) -> one (B, out_channels, h*s, w*s) map per scale s, in the order of `scales`."""

    def __init__(self, dim: int, out_channels: int = 256, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        if not scales:
            raise ValueError("a feature pyramid needs at least one scale")
        self.scales = tuple(float(s) for s in scales)
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        for s in self.scales:
            resample, width = _resample(dim, _log2_scale(s))
            self.stages.append(nn.Sequential(
                resample,
                nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels),
            ))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [stage(x) for stage in self.stages]  # each (B, C, h*s, w*s)


__all__ = ["LayerNorm2d", "SimpleFeaturePyramid"]
