"""Small Python API over models: features for downstream use."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from .mae import MaskedAutoencoderViT
from .vit import VisionTransformer

Pool = Literal["avg", "token", "dense"]


def encoder_tokens(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """All tokens (B, 1+L, D) of an MAE encoder (unmasked, after `norm`) or a ViT (after its blocks)."""
    if isinstance(model, MaskedAutoencoderViT):
        return model.forward_tokens(imgs)
    if isinstance(model, VisionTransformer):
        return model.forward_tokens(imgs)
    raise TypeError(f"expected a MaskedAutoencoderViT or VisionTransformer, got {type(model).__name__}")


def encode(model: nn.Module, imgs: torch.Tensor, pool: Pool = "avg") -> torch.Tensor:
    """Images -> features: 'avg' mean of patch tokens (B, D), 'token' the cls token (B, D), 'dense' (B, D, h, w).

    For a classification ViT, 'avg'/'token' matching its global_pool return exactly what its head sees.
    """
    if isinstance(model, VisionTransformer):
        if pool == "dense":
            return model.forward_dense(imgs)
        if pool == model.global_pool:
            return model.forward_features(imgs)
    tokens = encoder_tokens(model, imgs)  # (B, 1+L, D)
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)  # (B, D)
    if pool == "token":
        return tokens[:, 0]  # (B, D)
    if pool == "dense":
        h, w = model.patch_embed.grid_size
        return tokens[:, 1:].transpose(1, 2).reshape(imgs.shape[0], -1, h, w)  # (B, D, h, w)
    raise ValueError(f"pool must be 'avg', 'token' or 'dense', got {pool!r}")
