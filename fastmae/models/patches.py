"""Patchify / unpatchify in the official MAE pixel order.

Shapes: B batch, C channels, H, W image, p patch, h, w = H/p, W/p, L = h*w patches.
A patch vector is laid out (p, q, c): row inside the patch, column inside the patch, channel,
exactly as the official `models_mae.py`, so `decoder_pred` weights are interchangeable.
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C); H and W must be multiples of p."""
    if imgs.ndim != 4:
        raise ValueError(f"patchify expects images (B, C, H, W), got shape {tuple(imgs.shape)}")
    B, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(
            f"image size {H}x{W} is not divisible by the patch size {p}; "
            f"resize or crop the images to a multiple of {p}"
        )
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)  # (B, C, h, p, w, q)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, q, C)
    return x.reshape(B, h * w, p * p * C)  # (B, L, p*p*C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int, C: int) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, h*p, w*p); the exact inverse of `patchify`."""
    if x.ndim != 3:
        raise ValueError(f"unpatchify expects patches (B, L, p*p*C), got shape {tuple(x.shape)}")
    B, L, D = x.shape
    if L != h * w or D != p * p * C:
        raise ValueError(
            f"patches of shape {tuple(x.shape)} do not fit a {h}x{w} grid of {p}x{p} patches "
            f"with {C} channels (expected L={h * w}, dim={p * p * C})"
        )
    x = x.reshape(B, h, w, p, p, C)  # (B, h, w, p, q, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
    return x.reshape(B, C, h * p, w * p)  # (B, C, H, W)
