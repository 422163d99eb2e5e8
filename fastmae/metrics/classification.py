"""Classification scores (pure): how many samples have their label among the top-k logits.

Shapes: B batch, K classes.
"""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at K)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = top == labels[:, None]  # (B, maxk)
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]
