"""Per-sample random masking by argsort of noise (MAE, section 3).

Shapes: B batch, L patches, D width, K = int(L * (1 - mask_ratio)) kept patches.
Convention (the official one, used everywhere in fastmae): `mask` is (B, L) float with
1 = removed and 0 = kept; `ids_restore` is the inverse permutation of the shuffle.
"""

from __future__ import annotations

import torch


def num_kept(L: int, mask_ratio: float) -> int:
    """Number of visible patches K the official code keeps: int(L * (1 - mask_ratio))."""
    return int(L * (1 - mask_ratio))


def check_mask_ratio(mask_ratio: float) -> None:
    """Raise a ValueError unless 0 <= mask_ratio < 1."""
    if not (0.0 <= float(mask_ratio) < 1.0):
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the K patches with the smallest noise per sample.

    x: (B, L, D). noise: (B, L) in any range; when None it is drawn exactly as the official
    code does (`torch.rand(B, L, device=x.device)`), so a seeded run reproduces its mask.
    Returns x_kept (B, K, D), mask (B, L) with 1 = removed, ids_restore (B, L).
    """
    check_mask_ratio(mask_ratio)
    B, L, D = x.shape
    K = num_kept(L, mask_ratio)
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    elif noise.shape != (B, L):
        raise ValueError(f"noise must have shape (B, L) = {(B, L)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L) ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L) position of each patch in the shuffle
    ids_keep = ids_shuffle[:, :K]  # (B, K)
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
    # A patch is removed iff its position in the shuffled order is >= K; this equals the
    # official ones/zeros + gather construction without the extra buffers.
    mask = (ids_restore >= K).to(x.dtype if x.is_floating_point() else torch.float32)  # (B, L)
    return x_kept, mask, ids_restore
