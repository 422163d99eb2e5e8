"""Weighted k-nearest-neighbour classification on features (pure), as in DINO / the MAE kNN monitor.

Shapes: N train samples, M test samples, D feature width, K classes, k neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (M, K): cosine similarity to the k nearest train features, votes weighted by exp(sim/T).

    The weights are exp((sim - max sim) / T) per test row: the same ranking as exp(sim/T) (a per-row factor),
    but finite for any small T (exp(1/0.001) overflows float32 and every score became inf, i.e. chance).
    """
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got k={k}, temperature={temperature}")
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    k = min(k, train_feats.shape[0])
    # Cosine similarity without a normalised copy of the memory (with every patch token as features it is
    # N x L*D numbers, gigabytes): divide each chunk's dot products by the memory's norms instead.
    train = train_feats.float()  # (N, D)
    train_inv_norm = 1.0 / train.norm(dim=1).clamp_min(1e-12)  # (N,)
    test = F.normalize(test_feats.float(), dim=1)  # (M, D)
    out = torch.empty(test.shape[0], num_classes, dtype=torch.float32, device=test.device)
    for s in range(0, test.shape[0], chunk):
        sim = (test[s : s + chunk] @ train.T) * train_inv_norm  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        votes = F.one_hot(train_labels[top_idx], num_classes).float()  # (m, k, K)
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (m, k), topk is sorted: column 0 = max
        out[s : s + chunk] = (votes * weights.unsqueeze(-1)).sum(1)  # (m, K)
    return out


def knn_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    num_classes: int, k: int = 20, temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 (%) of the weighted kNN classifier."""
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices  # (M, 5)
    hit = top == test_labels[:, None]
    n = max(test_labels.numel(), 1)
    return {"top1": 100.0 * hit[:, 0].sum().item() / n, "top5": 100.0 * hit.any(1).sum().item() / n}
