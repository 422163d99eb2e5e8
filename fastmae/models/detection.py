"""A one-stage, multi-level detection head on a plain ViT: CenterNet's class-centre heatmaps on several levels of
ViTDet's simple feature pyramid, boxes regressed as distances to the four sides (FCOS) with a GIoU loss over each
centre's Gaussian (TTFNet), and non-maximum suppression across levels (per class, or across classes too). It needs
no RoIAlign (torchvision's ops are not available here; BENCHMARKS.md, "Detection", says why this head).

Shapes: B batch, D width, h, w patch grid, p patch, L levels of strides s_1 < ... < s_L (pixels), H_l, W_l a
level's map (the canvas over s_l), K classes, n boxes of an image (canvas pixels, x1 y1 x2 y2), k detections kept
per image.

- Levels: the pyramid's maps at strides `strides` (scales p / s of the patch grid). An object goes to one level
  by its longer side (FCOS's ranges): level l takes sides in (8 s_{l-1}, 8 s_l], the first from 0, the last
  without bound, so an object spans about 4-8 cells of its level.
- Head: one 3x3 conv + GELU + 1x1 branch for heatmap logits (K) and one for the four side distances, shared by
  every level, with a learned scale per level (FCOS): distances = exp(scale_l x) s_l pixels from the cell centre.
- Targets (Zhou et al., 2019, "Objects as Points"): a Gaussian per box on its class map at its level (radius from
  the box size at IoU 0.7), penalty-reduced focal loss (alpha 2, beta 4) normalised by the number of boxes; the
  box branch is trained at every cell of that Gaussian with the GIoU loss, each cell weighted by its Gaussian
  value, each box's weights summing to 1 (Liu et al., 2019, "Training-Time-Friendly Network"); where two boxes'
  Gaussians meet, the smaller box has the cell.
- Decode: 3x3 max-pool peaks of each level's heatmaps, the best `max_detections` of every level turned into
  boxes, then suppression across levels within each class (`boxes.batched_nms`, a group per class, as
  detectron2's and mmdet's one-stage detectors): an object whose peak shows on two levels gives one box.
  `class_agnostic`: one group per image, so an object whose peak shows on two classes also gives one box (at a
  cost in box AP where the second class's guess is often right: BENCHMARKS.md "Detection").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .boxes import batched_nms, giou_loss
from .heads import DenseHead
from .pyramid import SimpleFeaturePyramid

HEAT_PRIOR = 0.1  # initial centre probability of the heatmap logits (CenterNet's bias -2.19)
LEVEL_SPAN = 8  # a level of stride s takes objects up to LEVEL_SPAN * s pixels on their longer side (FCOS)
MAX_LOG_DISTANCE = 12.0  # distances are exp(.) s: the exponent is clamped here (exp(12) s is far off any canvas)


def auto_strides(patch_size: int, img_size: Sequence[int]) -> tuple[int, ...]:
    """The default levels: the patch grid and two coarser ones, strides p, 2p and 4p (4, 8, 16 for patch 4; 16,
    32, 64 for patch 16), those whose map has at least 2 x 2 cells. ViTDet's finer, upsampled levels (p/4, p/2)
    are left to --det.strides: on the built-in scenes a p/2 level cost box AP (BENCHMARKS.md "Detection")."""
    out = [s for s in (patch_size, 2 * patch_size, 4 * patch_size) if min(level_shape(img_size, patch_size, s)) >= 2]
    return tuple(out)


def level_shape(img_size: Sequence[int], patch_size: int, stride: int) -> tuple[int, int]:
    """The (H_l, W_l) of a level: the patch grid scaled by p / s (pooling floors, as SimpleFeaturePyramid)."""
    h, w = img_size[0] // patch_size, img_size[1] // patch_size
    if stride <= patch_size:
        return h * (patch_size // stride), w * (patch_size // stride)
    return h // (stride // patch_size), w // (stride // patch_size)


def check_strides(strides: Sequence[int], patch_size: int, img_size: Sequence[int]) -> tuple[int, ...]:
    """The levels' strides, checked: increasing powers-of-two ratios of the patch size, each map at least 1 x 1;
    ValueError naming --det.strides otherwise."""
    strides = tuple(int(s) for s in strides)
    for s in strides:
        ratio = s / patch_size
        if s < 1 or not math.log2(ratio).is_integer():
            raise ValueError(f"--det.strides {' '.join(map(str, strides))}: each stride must be the patch size "
                             f"{patch_size} times a power of two (e.g. {patch_size // 2 or 1} {patch_size} "
                             f"{2 * patch_size})")
        if min(level_shape(img_size, patch_size, s)) < 1:
            raise ValueError(f"--det.strides: stride {s} leaves no cell on a {img_size[0]}x{img_size[1]} canvas; "
                             f"use smaller strides or a larger --model.img_size")
    if not strides or list(strides) != sorted(set(strides)):
        raise ValueError(f"--det.strides {' '.join(map(str, strides))}: give one or more strides, increasing, "
                         f"each once")
    return strides


def level_of(boxes: torch.Tensor, strides: Sequence[int], span: float = LEVEL_SPAN) -> torch.Tensor:
    """(n, 4) xyxy boxes -> (n,) the level index each is assigned to by its longer side."""
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    bounds = torch.tensor([span * s for s in strides[:-1]], dtype=side.dtype)
    return torch.bucketize(side, bounds)  # level l: bounds[l-1] < side <= bounds[l]


def gaussian_radius(h: float, w: float, min_overlap: float = 0.7) -> float:
    """The largest centre shift (in output pixels) that keeps a box of h x w at IoU >= min_overlap with the truth
    (CenterNet's three cases: both corners inside, both outside, one of each), the smallest of the three."""
    a1, b1, c1 = 1.0, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def gaussian_window(H: int, W: int, cx: int, cy: int, radius: int) -> tuple[slice, slice, torch.Tensor]:
    """The window of a Gaussian of `radius` around cell (cx, cy) inside an H x W map: its (rows, cols) slices and
    values exp(-d^2 / (2 sigma^2)), sigma = diameter / 6 (1 at the centre)."""
    sigma = (2 * radius + 1) / 6
    y0, y1, x0, x1 = max(0, cy - radius), min(H, cy + radius + 1), max(0, cx - radius), min(W, cx + radius + 1)
    ys, xs = torch.arange(y0, y1), torch.arange(x0, x1)
    g = torch.exp(-((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2).float() / (2 * sigma**2))  # (r_y, r_x)
    return slice(y0, y1), slice(x0, x1), g


def cell_centres(H: int, W: int, stride: float, device=None) -> torch.Tensor:
    """(2, H, W): the canvas position (x, y) of each cell's centre, ((x + 0.5) s, (y + 0.5) s)."""
    ys = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) * stride
    return torch.stack([xs[None, :].expand(H, W), ys[:, None].expand(H, W)])


def encode_level(boxes: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int, shape: tuple[int, int],
                 stride: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level's targets from the boxes assigned to it (canvas pixels, per image): heatmaps (B, K, H_l, W_l),
    each cell's box (B, 4, H_l, W_l) xyxy canvas pixels, and its box-loss weight (B, H_l, W_l) (0 = no box)."""
    H, W = shape
    B = len(boxes)
    heat = torch.zeros(B, num_classes, H, W)
    target = torch.zeros(B, 4, H, W)
    weight = torch.zeros(B, H, W)
    for b, (bx, lb) in enumerate(zip(boxes, labels)):
        area = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])
        for j in torch.argsort(area, descending=True, stable=True).tolist():  # larger first: the smaller keeps a cell
            x1, y1, x2, y2 = (bx[j] / stride).tolist()
            w, h = x2 - x1, y2 - y1
            if w <= 0 or h <= 0:
                continue
            ix, iy = min(int((x1 + x2) / 2), W - 1), min(int((y1 + y2) / 2), H - 1)
            rows, cols, g = gaussian_window(H, W, ix, iy, max(0, int(gaussian_radius(h, w))))
            region = heat[b, int(lb[j]), rows, cols]
            torch.maximum(region, g, out=region)
            weight[b, rows, cols] = g / g.sum()
            target[b, :, rows, cols] = bx[j].view(4, 1, 1)
    return heat, target, weight


def focal_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss over heatmaps (B, K, H, W), summed (the caller divides by the number
    of boxes)."""
    p = logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum())


def _branch(c: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, out, 1))


class CenterNetHead(DenseHead):
    """forward(feats (B, D, h, w)) -> {'heat': [(B, K, H_l, W_l) logits per level], 'box': [(B, 4, H_l, W_l)
    distances left, top, right, bottom from each cell centre, canvas pixels]}; loss(out, targets with per-image
    'boxes' and 'labels') -> {'loss_focal', 'loss_box'}; predict(out) -> per image (boxes (k, 4), scores, labels)."""

    def __init__(self, dim: int, num_classes: int, patch_size: int, strides: Sequence[int] = (4, 8, 16),
                 channels: int = 64, max_detections: int = 100, nms_iou: float = 0.6, box_weight: float = 5.0,
                 class_agnostic: bool = False):
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.num_classes, self.max_detections, self.box_weight = num_classes, max_detections, box_weight
        self.nms_iou, self.class_agnostic = nms_iou, class_agnostic
        self.pyramid = SimpleFeaturePyramid(dim, channels, tuple(patch_size / s for s in self.strides))
        self.heat, self.box = _branch(channels, num_classes), _branch(channels, 4)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))  # per level, multiplies the box logits
        nn.init.constant_(self.heat[-1].bias, -math.log((1 - HEAT_PRIOR) / HEAT_PRIOR))

    def forward(self, feats: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        heat, box = [], []
        for x, s, scale in zip(self.pyramid(feats), self.strides, self.scales):  # x (B, c, H_l, W_l)
            heat.append(self.heat(x))
            box.append((scale * self.box(x).float()).clamp(max=MAX_LOG_DISTANCE).exp() * s)
        return {"heat": heat, "box": box}

    def loss(self, out: dict[str, list[torch.Tensor]], targets: dict) -> dict[str, torch.Tensor]:
        boxes, labels = [b.cpu().float() for b in targets["boxes"]], [lb.cpu() for lb in targets["labels"]]
        levels = [level_of(b, self.strides) for b in boxes]
        dev = out["heat"][0].device
        num = sum(int(((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).sum()) for b in boxes)
        focal, box_loss = torch.zeros((), device=dev), torch.zeros((), device=dev)
        for lvl, (heat, dist, s) in enumerate(zip(out["heat"], out["box"], self.strides)):
            mine = [lv == lvl for lv in levels]
            heat_t, box_t, weight = encode_level([b[m] for b, m in zip(boxes, mine)],
                                                 [lb[m] for lb, m in zip(labels, mine)], self.num_classes,
                                                 tuple(heat.shape[-2:]), s)
            focal = focal + focal_sum(heat, heat_t.to(dev))
            bi, yi, xi = weight.nonzero(as_tuple=True)
            if len(bi):
                centres = cell_centres(*heat.shape[-2:], s, dev)[:, yi.to(dev), xi.to(dev)].T  # (N, 2)
                d = dist.float()[bi.to(dev), :, yi.to(dev), xi.to(dev)]  # (N, 4)
                pred = torch.cat([centres - d[:, :2], centres + d[:, 2:]], 1)
                target = box_t[bi, :, yi, xi].to(dev)
                box_loss = box_loss + (giou_loss(pred, target) * weight[bi, yi, xi].to(dev)).sum()
            else:  # keep the box branch in the graph (DDP: every parameter gets a gradient each step)
                box_loss = box_loss + 0 * dist.sum()
        n = max(num, 1)
        return {"loss_focal": focal / n, "loss_box": self.box_weight * box_loss / n}

    @torch.no_grad()
    def predict(self, out: dict[str, list[torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image its detections, best first: every level's `max_detections` highest heatmap peaks as canvas
        boxes, suppressed across levels (and classes, when `class_agnostic`) at IoU above `nms_iou` (1: none), the
        best `max_detections`."""
        per_level = [decode_level(h.float().sigmoid(), d.float(), s, self.max_detections)
                     for h, d, s in zip(out["heat"], out["box"], self.strides)]
        result = []
        for b in range(len(out["heat"][0])):
            boxes = torch.cat([lv[0][b] for lv in per_level])
            scores = torch.cat([lv[1][b] for lv in per_level])
            labels = torch.cat([lv[2][b] for lv in per_level])
            groups = None if self.class_agnostic else labels
            keep = (batched_nms(boxes, scores, self.nms_iou, groups) if self.nms_iou < 1
                    else torch.sort(scores, descending=True, stable=True).indices)[: self.max_detections]
            result.append((boxes[keep], scores[keep], labels[keep]))
        return result


def decode_level(heat: torch.Tensor, dist: torch.Tensor, stride: float,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level: heatmaps (B, K, H, W) in [0, 1] and side distances (B, 4, H, W) -> its k highest peaks (a 3x3
    max-pool keeps local maxima) as boxes (B, k, 4) xyxy canvas pixels, scores (B, k), labels (B, k)."""
    B, K, H, W = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)  # (B, K, H, W): local maxima only
    scores, idx = peaks.flatten(1).topk(min(k, K * H * W))  # (B, k)
    labels, cell = idx // (H * W), idx % (H * W)  # (B, k)
    centres = cell_centres(H, W, stride, heat.device).flatten(1)[:, cell]  # (2, B, k)
    d = dist.flatten(2).gather(2, cell[:, None].expand(-1, 4, -1))  # (B, 4, k)
    boxes = torch.stack([centres[0] - d[:, 0], centres[1] - d[:, 1], centres[0] + d[:, 2], centres[1] + d[:, 3]], -1)
    return boxes, scores, labels


__all__ = ["CenterNetHead", "auto_strides", "check_strides", "decode_level", "encode_level", "focal_sum",
           "gaussian_radius", "level_of", "level_shape"]
