"""Fixed 2D sin-cos position embeddings and resampling to other grids.

Shapes: h, w patch grid, L = h*w, D width, n_prefix leading tokens without a position (cls).
Numerically equal to the official `util/pos_embed.py` (computed in float64, then cast): the first
D/2 channels encode the column (w) coordinate, the last D/2 the row (h) coordinate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) -> (M, dim): [sin(pos * omega), cos(pos * omega)], omega = 1/10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dimension must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_2d(grid_h: int, grid_w: int, dim: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2D sin-cos embedding for an h x w grid: (h*w, dim), or (1+h*w, dim) with a zero cls row."""
    if dim % 4:
        raise ValueError(
            f"embed_dim {dim} must be divisible by 4 for the 2D sin-cos position embedding"
        )
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    gh, gw = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    emb = torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1)  # (L, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)  # (1+L, dim)
    return emb.float()


def resample_pos_embed(
    pos_embed: torch.Tensor, new_hw: tuple[int, int], old_hw: tuple[int, int] | None = None, n_prefix: int = 1
) -> torch.Tensor:
    """Bicubic resampling of a (1, n_prefix + h*w, D) embedding to a new grid; prefix tokens kept.

    `old_hw` defaults to a square grid. Returns (1, n_prefix + new_h*new_w, D).
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, N, D), got {tuple(pos_embed.shape)}")
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]  # (1, n, D), (1, L, D)
    L, D = grid.shape[1], grid.shape[2]
    if old_hw is None:
        side = int(round(L**0.5))
        if side * side != L:
            raise ValueError(f"cannot infer a square grid from {L} position tokens; pass old_hw")
        old_hw = (side, side)
    if old_hw[0] * old_hw[1] != L:
        raise ValueError(f"old grid {old_hw} does not match {L} position tokens")
    if tuple(old_hw) == tuple(new_hw):
        return pos_embed
    g = grid.reshape(1, old_hw[0], old_hw[1], D).permute(0, 3, 1, 2)  # (1, D, h, w)
    g = F.interpolate(g.float(), size=tuple(new_hw), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], D).to(pos_embed.dtype)  # (1, L', D)
    return torch.cat([prefix, g], dim=1)  # (1, n_prefix + L', D)
