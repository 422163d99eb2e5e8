"""Images -> features, the one feature path of every command and of `fastmae.encode`: pooled vectors, every patch
token, or dense (B, D, h, w) maps of chosen blocks.

Shapes: B batch, C channels, H, W image, L patches, h, w patch grid, D width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn

from .mae import MaskedAutoencoderViT
from .vit import VisionTransformer

Pool = Literal["avg", "token", "tokens", "dense"]


# Frozen-feature choice for kNN and linear probes (`--model.global_pool auto`): every patch token when the patch
# grid is this small, the mean of the patch tokens above. On 28x28 Fashion-MNIST (7x7 grid) the flattened tokens
# keep the layout mean pooling throws away (BENCHMARKS.md, "Which features"); on 224 px images (196 tokens) they
# would be 196 x D numbers per image, too many to keep for a whole dataset.
TOKENS_MAX_PATCHES = 64


def feature_pool(pool: str, model: nn.Module) -> str:
    """'auto' -> 'tokens' for a patch grid of at most TOKENS_MAX_PATCHES patches, else 'avg'; others unchanged."""
    if pool != "auto":
        return pool
    h, w = model.patch_embed.grid_size
    return "tokens" if h * w <= TOKENS_MAX_PATCHES else "avg"


def encode(model: nn.Module, imgs: torch.Tensor, pool: Pool = "avg",
           layers: Sequence[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Images -> features: 'avg' mean of patch tokens (B, D), 'token' the cls token (B, D), 'tokens' every patch
    token flattened in patch order (B, L*D), 'dense' (B, D, h, w).

    Tokens come from the model's `forward_features` (after its final `norm`). For a classification ViT, the
    pool matching its global_pool returns exactly what its head sees (`forward_head(pre_logits=True)`).
    An MAE and its encoder loaded as a cls-token ViT give the same features for every pool.

    'dense' takes any input whose sides are multiples of the patch size (position embeddings resampled and
    cached per grid). layers (dense only): block indices, negative from the end; returns one (B, D, h, w) map
    per index, each after the final `norm` as in timm's `forward_intermediates` (an avg-pool ViT's `norm` is
    Identity: its maps are un-normalised). layers=None returns the last block's map alone.
    """
    if pool not in ("avg", "token", "tokens", "dense"):
        raise ValueError(f"pool must be 'avg', 'token', 'tokens' or 'dense', got {pool!r}")
    if not isinstance(model, (MaskedAutoencoderViT, VisionTransformer)):
        raise TypeError(f"expected a MaskedAutoencoderViT or VisionTransformer, got {type(model).__name__}")
    if pool == "dense":
        maps = model.forward_intermediates(imgs, (-1,) if layers is None else tuple(layers), norm=True)
        return maps[0] if layers is None else maps  # (B, D, h, w) or a list of them
    if layers is not None:
        raise ValueError(f"layers needs pool='dense' (maps per block), got pool={pool!r}")
    tokens = model.forward_features(imgs)  # (B, 1+L, D)
    if isinstance(model, VisionTransformer) and pool == model.global_pool:
        return model.forward_head(tokens, pre_logits=True)  # (B, D)
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)  # (B, D)
    if pool == "tokens":
        return tokens[:, 1:].flatten(1)  # (B, L*D)
    return tokens[:, 0]  # (B, D)
