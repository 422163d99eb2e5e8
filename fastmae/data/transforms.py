"""Crop geometry and resampling as pure tensor functions: RandomResizedCrop boxes, the evaluation crop,
Pillow-equal bicubic resizing by two matrix products, per-channel normalisation.

Shapes: B batch, C channels, h, w source image, H, W output image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
EVAL_CROP_PCT = 0.875  # evaluation: resize to img_size / 0.875, then centre crop (224 <- 256)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n RandomResizedCrop boxes (top, left, h, w) as int64 (n, 4), drawn at once.

    Same rule as torchvision: up to 10 tries of an area in scale x image area and a log-uniform
    aspect ratio; the first try that fits wins; if none fits, the centre crop clamped to `ratio`.
    """
    tries = 10
    area = height * width
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)  # (n, tries)
    log_ratio = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = (target * aspect).sqrt().round().long()  # (n, tries)
    h = (target / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # (n, 1): index of the first try that fits
    h = h.gather(1, first).squeeze(1)  # (n,)
    w = w.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, generator=generator)  # uniform position among the valid offsets
    top = (u[:, 0] * (height - h + 1).clamp(min=1)).long().clamp(max=(height - h).clamp(min=0))
    left = (u[:, 1] * (width - w + 1).clamp(min=1)).long().clamp(max=(width - w).clamp(min=0))
    boxes = torch.stack([top, left, h, w], 1)  # (n, 4)
    fallback = torch.tensor(_fallback_box(height, width, ratio))
    return torch.where(fits.any(1, keepdim=True), boxes, fallback)


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """One RandomResizedCrop box (top, left, h, w) inside a height x width image.

    sample_crop_boxes(1, ...)'s rule and its draws from `generator` (the same numbers, in the same order), with the
    arithmetic in Python: a file loader calls this once per image, where ~20 tiny tensor ops cost more than the box.
    """
    tries = 10
    area = height * width
    targets = torch.empty(tries).uniform_(scale[0], scale[1], generator=generator).tolist()
    log_ratios = torch.empty(tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).tolist()
    u_top, u_left = torch.rand(2, generator=generator).tolist()
    for target, log_ratio in zip(targets, log_ratios):
        aspect = math.exp(log_ratio)
        w, h = round(math.sqrt(area * target * aspect)), round(math.sqrt(area * target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return min(int(u_top * (height - h + 1)), height - h), min(int(u_left * (width - w + 1)), width - w), h, w
    return _fallback_box(height, width, ratio)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback when no try fits: the largest centred box with aspect ratio in `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def eval_crop_box(height: int, width: int, out_h: int, out_w: int) -> tuple[float, float, float, float]:
    """(top, left, h, w) of 'resize so the image covers out / 0.875, then centre crop out', in source pixels.

    An image already out_h x out_w is left alone (the whole image, no resampling).
    """
    if (height, width) == (out_h, out_w):
        return 0.0, 0.0, float(height), float(width)
    s = max(out_h / EVAL_CROP_PCT / height, out_w / EVAL_CROP_PCT / width)  # resize factor
    h, w = out_h / s, out_w / s
    return (height - h) / 2, (width - w) / 2, h, w


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with Pillow's a = -0.5; zero for |t| >= 2."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1  # |t| <= 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # 1 < |t| < 2
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros((), dtype=t.dtype)))


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """(B, n_out, n_in) weights taking [start, start + length) of an axis to n_out pixels, like Pillow.

    The kernel is stretched by the shrink factor when shrinking (antialiasing); taps outside the
    image are dropped and the rest renormalised, as Pillow's resize does. Only the T taps under
    the kernel are evaluated, then scattered into the dense matrix.
    """
    scale = length / n_out  # (B,) source pixels per output pixel
    support = scale.clamp(min=1.0)[:, None, None]  # (B, 1, 1) kernel stretch
    centre = start[:, None] + (torch.arange(n_out) + 0.5) * scale[:, None]  # (B, n_out), edge coordinates
    taps = math.ceil(4 * float(support.max())) + 2  # T: covers the kernel's 4 * support width
    first = (centre - 0.5 - 2 * support[..., 0]).floor().long()  # (B, n_out) leftmost tap
    idx = first.unsqueeze(-1) + torch.arange(taps)  # (B, n_out, T)
    w = _cubic((idx + 0.5 - centre.unsqueeze(-1)) / support)  # (B, n_out, T)
    w = w * ((idx >= 0) & (idx < n_in))  # drop taps outside the image
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-8)
    out = torch.zeros(len(start), n_out, n_in)
    return out.scatter_add_(2, idx.clamp(0, n_in - 1), w)  # (B, n_out, n_in)


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop box (top, left, h, w) of each image in [0, 1], resize it bicubically to size, mirror where flip.

    images (B, C, h, w) float, boxes (B, 4) (fractional boxes allowed), flip (B,) bool -> (B, C, H, W).
    Separable: two batched matrix products. A crop smaller than `size` is upscaled.
    """
    H, W = size
    boxes = boxes.to(torch.float32)
    wy = _resample_matrix(boxes[:, 0], boxes[:, 2], images.shape[-2], H)  # (B, H, h)
    wx = _resample_matrix(boxes[:, 1], boxes[:, 3], images.shape[-1], W)  # (B, W, w)
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)  # mirrored output columns
    out = wy.unsqueeze(1) @ images @ wx.unsqueeze(1).transpose(-1, -2)  # (B, C, H, W)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots at edges; Pillow clips the same way for 8-bit


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., C, H, W) pixels in [0, 1] -> (pixels - mean) / std per channel."""
    mean_t, std_t = _channel_stats(images, mean, std)
    return (images - mean_t) / std_t


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo `normalize`: (..., C, H, W) normalised -> pixel values in [0, 1] (not clamped)."""
    mean_t, std_t = _channel_stats(images, mean, std)
    return images * std_t + mean_t


def _channel_stats(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, ...]:
    """mean and std as (C, 1, 1) tensors on the images' device and dtype."""
    kw = dict(dtype=images.dtype, device=images.device)
    return torch.tensor(mean, **kw).view(-1, 1, 1), torch.tensor(std, **kw).view(-1, 1, 1)
