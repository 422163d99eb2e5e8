"""Box geometry a detector needs and torchvision.ops would give (not importable beside the CPU torch here):
pairwise IoU, the generalised-IoU loss, and greedy non-maximum suppression, each written once.

Shapes: n, m boxes, (n, 4) x1 y1 x2 y2 in any one frame (pixels); scores (n,); groups (n,) integers.
"""

from __future__ import annotations

import numpy as np
import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(n, 4) xyxy -> (n,) areas (0 for an empty or inverted box)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, 4), (m, 4) xyxy -> (n, m) intersection over union (0 where both are empty)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (n, m, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (n, m, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)  # (n, m)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalised IoU (Rezatofighi et al., 2019) of paired boxes (n, 4), (n, 4) -> (n,) in [0, 2]: unlike
    an L1 on the sides it is scale-free, and it still has a gradient when the boxes do not overlap."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(pred) + box_area(target) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0)
    hull_area = hull.prod(-1)
    return 1 - (iou - (hull_area - union) / hull_area.clamp(min=1e-6))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                groups: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression: the indices of the boxes kept, best score first. A box is dropped when a
    better-scoring kept box of its group overlaps it with IoU above `iou_threshold`; boxes of different groups
    never suppress each other (groups=None: one group, class-agnostic suppression). Ties in score keep the earlier
    index first. The same rule as torchvision.ops.batched_nms."""
    n = len(boxes)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].float()
    over = box_iou(b, b) > iou_threshold  # (n, n) in score order
    if groups is not None:
        g = groups[order]
        over &= g[:, None] == g[None, :]
    over = over.cpu().numpy()
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):  # n is a detector's candidates (hundreds): a row of the IoU matrix per kept box
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


__all__ = ["batched_nms", "box_area", "box_iou", "giou_loss"]
