"""An encoder with a task head: the one model every head-training command builds (linear probe, segmentation;
detection and pose heads plug in the same way; a task that reads the encoder
its own way overrides `encode_features`, as pose does).

The encoder is frozen (no gradients, eval mode, run under no_grad) unless `finetune`; then it trains with the head
(layer-wise lr decay is the optimizer's business). `pool` picks the features the head reads, as `fastmae.encode`
names them: 'dense' (B, D, h, w) maps for dense heads, 'avg' / 'token' / 'tokens' vectors for classification.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .encode import encode


class DenseModel(nn.Module):
    """forward(images (B, C, H, W)) -> head(features): what `head.loss` and `head.predict` take."""

    def __init__(self, encoder: nn.Module, head: nn.Module, finetune: bool = False, pool: str = "dense"):
        super().__init__()
        self.encoder, self.head, self.finetune, self.pool = encoder, head, finetune, pool
        if not finetune:
            for p in encoder.parameters():
                p.requires_grad_(False)

    def encode_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The features the head reads (`fastmae.encode` with `pool`; a task may read the encoder its own way)."""
        return encode(self.encoder, imgs, self.pool)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder's features; without gradients (and in eval mode) when frozen."""
        if self.finetune:
            return self.encode_features(imgs)
        with torch.no_grad():
            self.encoder.eval()
            return self.encode_features(imgs)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(imgs).float())
