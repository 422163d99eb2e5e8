"""A CenterNet-style detection head on a plain ViT: class-centre heatmaps plus box size and centre offset, decoded
by 3x3 max-pool peaks. It needs no RoIAlign and no NMS (torchvision's ops are not available here; BENCHMARKS.md,
"Detection", says why this head).

Shapes: B batch, D width, h, w patch grid, p patch, s output stride (pixels), h', w' = h*p/s, w*p/s, K classes,
n boxes of an image (canvas pixels, x1 y1 x2 y2), k detections kept per image. The head reads the ViT map
through one SimpleFeaturePyramid level (scale p/s: ViTDet's deconvolutions up, or pooling down), then three
3x3 conv + GELU + 1x1 branches: heatmap logits (K), size (2: box w, h in output pixels), offset (2: the centre's
sub-pixel position). Targets (Zhou et al., 2019, "Objects as Points"): a Gaussian per box on its class map
(radius from the box size at IoU 0.7), penalty-reduced focal loss (alpha 2, beta 4), L1 on size (weight 0.1)
and offset at the centres.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import DenseHead
from .pyramid import SimpleFeaturePyramid

HEAT_PRIOR = 0.1  # initial centre probability of the heatmap logits (CenterNet's bias -2.19)


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


def draw_gaussian(heat: torch.Tensor, cx: int, cy: int, radius: int) -> None:
    """heat (h', w') <- max(heat, exp(-d^2 / (2 sigma^2))) around (cx, cy), sigma = diameter / 6, in place."""
    H, W = heat.shape
    sigma = (2 * radius + 1) / 6
    ys = torch.arange(max(0, cy - radius), min(H, cy + radius + 1))
    xs = torch.arange(max(0, cx - radius), min(W, cx + radius + 1))
    g = torch.exp(-((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2).float() / (2 * sigma**2))  # (r_y, r_x)
    region = heat[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    torch.maximum(region, g.to(heat), out=region)


def encode_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int, out_hw: tuple[int, int],
                   stride: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch CenterNet targets: heatmaps (B, K, h', w'), and for every box its centre cell as (b, y, x) (N, 3),
    size (N, 2) and offset (N, 2) in output pixels."""
    H, W = out_hw
    heat = torch.zeros(len(boxes), num_classes, H, W)
    cells, sizes, offsets = [], [], []
    for b, (bx, lb) in enumerate(zip(boxes, labels)):
        for box, c in zip((bx.cpu() / stride).tolist(), lb.tolist()):
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            if w <= 0 or h <= 0:
                continue
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ix, iy = min(int(cx), W - 1), min(int(cy), H - 1)
            draw_gaussian(heat[b, c], ix, iy, max(0, int(gaussian_radius(h, w))))
            cells.append((b, iy, ix))
            sizes.append((w, h))
            offsets.append((cx - ix, cy - iy))
    as_t = (lambda v, n: torch.tensor(v, dtype=torch.float32).view(-1, n))
    return heat, torch.tensor(cells, dtype=torch.int64).view(-1, 3), as_t(sizes, 2), as_t(offsets, 2)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss over heatmaps (B, K, h', w'), normalised by the number of centres."""
    p = logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def _branch(c: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, out, 1))


class CenterNetHead(DenseHead):
    """forward(feats (B, D, h, w)) -> {'heat': (B, K, h', w') logits, 'size': (B, 2, h', w'), 'offset': (B, 2, h', w')};
    loss(out, targets with per-image 'boxes' and 'labels') -> {'loss_focal', 'loss_size', 'loss_offset'}; predict(out) -> per image (boxes (k, 4), scores, labels)."""

    def __init__(self, dim: int, num_classes: int, patch_size: int, stride: int = 4, channels: int = 64,
                 max_detections: int = 100, size_weight: float = 0.1):
        super().__init__()
        if patch_size % stride and stride % patch_size:
            raise ValueError(f"the output stride {stride} must divide the patch size {patch_size} or be a multiple "
                             f"of it")
        self.num_classes, self.stride, self.max_detections = num_classes, stride, max_detections
        self.size_weight = size_weight
        self.pyramid = SimpleFeaturePyramid(dim, channels, (patch_size / stride,))
        self.heat, self.size, self.offset = _branch(channels, num_classes), _branch(channels, 2), _branch(channels, 2)
        nn.init.constant_(self.heat[-1].bias, -math.log((1 - HEAT_PRIOR) / HEAT_PRIOR))

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.pyramid(feats)[0]  # (B, c, h', w')
        return {"heat": self.heat(x), "size": self.size(x), "offset": self.offset(x)}

    def loss(self, out: dict[str, torch.Tensor], targets: dict) -> dict[str, torch.Tensor]:
        heat, cells, size, offset = encode_targets(targets["boxes"], targets["labels"], self.num_classes,
                                                   tuple(out["heat"].shape[-2:]), self.stride)
        dev = out["heat"].device
        terms = {"loss_focal": focal_loss(out["heat"], heat.to(dev))}
        if len(cells):
            b, y, x = cells.to(dev).unbind(1)
            pred_size = out["size"].float()[b, :, y, x]  # (N, 2)
            pred_off = out["offset"].float()[b, :, y, x]  # (N, 2)
            terms["loss_size"] = self.size_weight * F.l1_loss(pred_size, size.to(dev))
            terms["loss_offset"] = F.l1_loss(pred_off, offset.to(dev))
        else:  # no box in the batch: the same terms, zero (constants: these branches get no gradient, as before)
            terms["loss_size"] = terms["loss_offset"] = torch.zeros((), device=dev)
        return terms

    @torch.no_grad()
    def predict(self, out: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The k highest heatmap peaks (a 3x3 max-pool keeps local maxima) as boxes in canvas pixels."""
        return decode(out["heat"].float().sigmoid(), out["size"].float(), out["offset"].float(), self.stride,
                      self.max_detections)


def decode(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, stride: float,
           k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Heatmaps (B, K, h', w') in [0, 1] -> per image (boxes (k, 4) xyxy canvas pixels, scores (k,), labels (k,))."""
    B, K, H, W = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)  # (B, K, H, W): local maxima only
    scores, idx = peaks.flatten(1).topk(min(k, K * H * W))  # (B, k)
    labels, cell = idx // (H * W), idx % (H * W)  # (B, k)
    ys, xs = (cell // W).float(), (cell % W).float()  # (B, k)
    gather = lambda t: t.flatten(2).gather(2, cell[:, None].expand(-1, 2, -1))  # (B, 2, k)
    wh, off = gather(size), gather(offset)
    cx, cy = xs + off[:, 0], ys + off[:, 1]
    boxes = torch.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], -1) * stride
    return [(boxes[b], scores[b], labels[b]) for b in range(B)]
