"""Task heads on encoder features, all with one interface: `forward(feats)`, `loss(out, targets)`, `predict(out)`.

`DenseModel` (models/dense.py) puts a head on an encoder; a command's loss is `head.loss(model(x), targets)` and its
evaluation reads `head.predict(model(x))`, whatever the targets are (labels, label maps, boxes, keypoints). Dense
heads derive from `DenseHead`, whose `loss` is a dict of named terms (mmpose's BaseHead): the training loop sums
them and logs each (`loss_*` in log.jsonl and TensorBoard). Shapes: B batch, D width, h, w patch grid, p patch,
K classes, H, W image (h*p, w*p).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pyramid import LayerNorm2d, SimpleFeaturePyramid


def bn_linear(dim: int, num_classes: int, spatial: bool) -> tuple[nn.Module, nn.Module]:
    """The linear probe's pair: BatchNorm without affine (a parameter-free whitening) and a linear layer (a 1x1
    conv on maps) with trunc-normal weights (std 0.01) and zero bias, as the paper's linear probe."""
    bn = (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(dim, affine=False, eps=1e-6)
    fc = nn.Conv2d(dim, num_classes, 1) if spatial else nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return bn, fc


class DenseHead(nn.Module):
    """A dense task's head: forward(feats (B, D, h, w)) -> out; loss(out, targets) -> {'loss_<term>': scalar}, the
    terms summed to train and logged apart; predict(out) -> the task's predictions (classes, boxes, keypoints)."""

    def loss(self, out, targets) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, out):
        raise NotImplementedError


class LinearHead(nn.Module):
    """Classification of a feature vector (B, D) -> logits (B, K): BatchNorm without affine, then linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn, self.fc = bn_linear(dim, num_classes, spatial=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(feats))  # (B, K)

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), targets)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(1)  # (B,)


class SegmentationHead(DenseHead):
    """Per-pixel classes from the patch map: `logits` at the head's own resolution, upsampled bilinearly to the
    image (the grid times the patch size); cross entropy skips `ignore_index` pixels."""

    def __init__(self, patch_size: int, ignore_index: int = 255):
        super().__init__()
        self.patch_size, self.ignore_index = patch_size, ignore_index

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h, w = feats.shape[-2:]
        out = self.logits(feats)  # (B, K, h', w')
        return F.interpolate(out, size=(h * self.patch_size, w * self.patch_size), mode="bilinear",
                             align_corners=False)  # (B, K, H, W)

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss_ce": F.cross_entropy(out.float(), targets, ignore_index=self.ignore_index)}

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(1)  # (B, H, W)


class LinearSegHead(SegmentationHead):
    """BatchNorm without affine + 1x1 conv on the patch map: the linear probe of segmentation."""

    def __init__(self, dim: int, num_classes: int, patch_size: int, ignore_index: int = 255):
        super().__init__(patch_size, ignore_index)
        self.bn, self.cls = bn_linear(dim, num_classes, spatial=True)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.cls(self.bn(feats))  # (B, K, h, w)


class FPNSegHead(SegmentationHead):
    """SimpleFeaturePyramid, every level upsampled to the finest and summed, then 3x3 conv + LN + GELU + 1x1."""

    def __init__(self, dim: int, num_classes: int, patch_size: int, ignore_index: int = 255, channels: int = 64,
                 scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__(patch_size, ignore_index)
        self.pyramid = SimpleFeaturePyramid(dim, channels, scales)
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels),
                                  nn.GELU())
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        levels = self.pyramid(feats)  # each (B, c, h*s, w*s)
        size = max((lv.shape[-2:] for lv in levels), key=lambda s: s[0] * s[1])
        fused = sum(F.interpolate(lv, size=size, mode="bilinear", align_corners=False) if lv.shape[-2:] != size else lv
                    for lv in levels)  # (B, c, h*s_max, w*s_max)
        return self.cls(self.fuse(fused))  # (B, K, h*s_max, w*s_max)

def build_seg_head(kind: str, dim: int, num_classes: int, patch_size: int, ignore_index: int = 255,
                   fpn_channels: int = 64) -> SegmentationHead:
    """`fastmae segment`'s head by name ('linear' or 'fpn') for a D-wide patch map of stride `patch_size`: what
    training builds and what reading a segmenter run builds again."""
    if kind == "linear":
        return LinearSegHead(dim, num_classes, patch_size, ignore_index)
    if kind == "fpn":
        return FPNSegHead(dim, num_classes, patch_size, ignore_index, fpn_channels)
    raise ValueError(f"unknown segmentation head {kind!r}; choose linear or fpn")

