"""Semantic segmentation scores from a confusion matrix: mIoU, pixel accuracy, per-class IoU (pure).

Shapes: K classes; labels and predictions (B, H, W) int64.
"""

from __future__ import annotations

import torch


def confusion_counts(labels: torch.Tensor, preds: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K*K,) float64 counts of (label, prediction) pairs over the pixels whose label is not `ignore_index`."""
    valid = labels != ignore_index  # (B, H, W)
    return torch.bincount(labels[valid] * num_classes + preds[valid], minlength=num_classes**2).double()


def seg_metrics(conf: torch.Tensor, classes: list[str]) -> dict:
    """mIoU (mean over classes present in label or prediction), pixel accuracy and per-class IoU, all in %."""
    conf = conf.double()
    tp = conf.diag()  # (K,)
    union = conf.sum(0) + conf.sum(1) - tp  # (K,)
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))  # (K,)
    present = ~iou.isnan()
    total = conf.sum().item()
    return {
        "miou": 100.0 * iou[present].mean().item() if present.any() else 0.0,
        "pixel_acc": 100.0 * tp.sum().item() / max(total, 1),
        "per_class_iou": {c: (None if v != v else 100.0 * v) for c, v in zip(classes, iou.tolist())},
        "pixels": int(total),
    }
