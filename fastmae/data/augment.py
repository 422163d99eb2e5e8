"""Fine-tuning regularisation on whole batches: RandAugment, random erasing, mixup / CutMix, soft targets.

Shapes: B batch, C channels, H, W image, K classes, b the samples one op is applied to.

The MAE paper fine-tunes with timm's recipe (`rand-m9-mstd0.5-inc1`, random erasing 0.25 in
'pixel' mode, mixup 0.8, CutMix 1.0, label smoothing 0.1). Here every piece is a pure function of
the batch and a `torch.Generator`, run in the main process after the loader, so it behaves the
same for every data source and a seed reproduces it. `FinetuneAugment` composes them in timm's
order: per sample RandAugment (on pixels in [0, 1]) then random erasing (in normalised space),
then mixup / CutMix on the batch.

Channels: the ops work for any C. Colour (saturation) is the identity for C = 1 and blends with
the channel mean for C not in (1, 3); Contrast's grey level is the ITU-R 601 luma for C = 3 and
the mean over channels otherwise; AutoContrast, Equalize, Posterize and Solarize act per channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AugConfig
from . import denormalize, normalize

Tensor = torch.Tensor

# The RandAugment paper's 14 ops (the default), and timm's 'inc1' list that the MAE code used
# (no Identity; Invert and SolarizeAdd instead).
RAND_OPS = (
    "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)
TIMM_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)
MAX_MAGNITUDE = 10.0  # magnitudes are m out of 10, as in timm ('rand-m9' = 9 / 10 of each op's range)
_LUMA = (0.299, 0.587, 0.114)  # Pillow's RGB -> L weights


# ---------------------------------------------------------------------------------------------
# Randomness: everything is drawn from the generator passed in
# ---------------------------------------------------------------------------------------------


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform [0, 1) numbers on the CPU from `generator` (drawn on its device, so CUDA generators work)."""
    return torch.rand(shape, generator=generator, device=generator.device).cpu()


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Standard normal numbers on the CPU from `generator`."""
    return torch.randn(shape, generator=generator, device=generator.device).cpu()


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha), reproducible from `generator`.

    torch's Beta sampler only uses the global RNG, so a 63-bit seed is drawn from `generator` and
    handed to a private NumPy Generator (no global state is read or changed).
    """
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix and soft targets
# ---------------------------------------------------------------------------------------------


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) int labels -> (B, K) targets one_hot * (1 - s) + s / K."""
    one_hot = F.one_hot(labels.long(), num_classes).float()  # (B, K)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator
) -> tuple[tuple[int, int, int, int], float]:
    """A box (top, bottom, left, right) of area (1 - lam) of the image at a uniform centre, clipped to it.

    Returns the box and lam corrected to the area actually pasted: 1 - box area / image area.
    """
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    u = _rand((2,), generator)
    cy, cx = int(u[0] * height), int(u[1] * width)  # uniform integer centre in [0, H) x [0, W)
    top, left = cy - cut_h // 2, cx - cut_w // 2
    bottom, right = min(top + cut_h, height), min(left + cut_w, width)
    top, left = max(top, 0), max(left, 0)
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return (top, bottom, left, right), lam


def mixup_cutmix(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.1,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Mix each sample with its partner in the flipped batch (index B-1-i), timm's Mixup in 'batch' mode.

    With probability `prob` the batch is mixed: by CutMix with probability `switch_prob` when both
    alphas are on (else by whichever is on), with lam ~ Beta(alpha, alpha) for the whole batch.
    Mixup: lam * x + (1 - lam) * x_flipped. CutMix: a box of area 1 - lam is pasted from
    x_flipped and lam is corrected to the pasted area. Targets (B, K) = lam * smooth(y) +
    (1 - lam) * smooth(y_flipped). The inputs are not modified.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
    targets = smooth_one_hot(labels, num_classes, smoothing).to(images.device)  # (B, K)
    if (mixup_alpha == 0 and cutmix_alpha == 0) or prob <= 0:
        return images, targets
    u = _rand((2,), generator)  # apply?, cutmix?
    if u[0] >= prob:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or bool(u[1] < switch_prob))
    lam = sample_beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    flipped = images.flip(0)  # (B, C, H, W): partner of sample i is B-1-i
    if use_cutmix:
        (top, bottom, left, right), lam = cutmix_box(images.shape[-2], images.shape[-1], lam, generator)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
    else:
        mixed = torch.lerp(flipped, images, lam)  # lam * x + (1 - lam) * x_flipped in one pass
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_k targets_k * log_softmax(logits)_k; logits, targets (B, K)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# RandAugment ops on (b, C, H, W) pixels in [0, 1]; per-sample arguments are (b,) tensors
# ---------------------------------------------------------------------------------------------


def _per_sample(v: Tensor) -> Tensor:
    """(b,) -> (b, 1, 1, 1) for broadcasting over (C, H, W)."""
    return v.view(-1, 1, 1, 1)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """Pillow's ImageEnhance: degenerate + factor * (x - degenerate), clipped to [0, 1]."""
    return (degenerate + _per_sample(factor) * (x - degenerate)).clamp(0.0, 1.0)


def _grey(x: Tensor) -> Tensor:
    """(b, C, H, W) -> (b, 1, H, W): ITU-R 601 luma for C = 3, the channel mean otherwise."""
    if x.shape[1] == 3:
        return torch.einsum("bchw,c->bhw", x, x.new_tensor(_LUMA)).unsqueeze(1)
    return x.mean(1, keepdim=True)


def _to_uint8(x: Tensor) -> Tensor:
    """[0, 1] floats -> 0..255 int64 levels, as Pillow sees the image."""
    return (x * 255.0).round().clamp(0, 255).long()


def invert(x: Tensor) -> Tensor:
    """1 - x."""
    return 1.0 - x


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to [0, 1] (Pillow's autocontrast, cutoff 0); flat channels stay."""
    lo = x.amin((2, 3), keepdim=True)  # (b, C, 1, 1)
    hi = x.amax((2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=1e-12), x).clamp(0.0, 1.0)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per channel of each image, Pillow's rule on 256 levels.

    lut[i] = (step // 2 + #pixels below level i) // step, with step = (#pixels - count of the
    highest occupied level) // 255; a channel with step 0 (nearly constant) is left alone.
    """
    b, c, h, w = x.shape
    q = _to_uint8(x).view(b * c, h * w)  # (bC, HW) levels
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    last = 255 - (hist.flip(1) > 0).long().argmax(1, keepdim=True)  # (bC, 1) highest occupied level
    step = (h * w - hist.gather(1, last)) // 255  # (bC, 1)
    below = hist.cumsum(1) - hist  # (bC, 256) pixels strictly below each level
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)  # (bC, 256)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return (lut.gather(1, q).view(b, c, h, w).to(x.dtype) / 255.0)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert the pixels whose 0..255 level is >= threshold (b,); threshold 256 = identity."""
    return torch.where(_to_uint8(x) >= _per_sample(threshold), 1.0 - x, x)


def solarize_add(x: Tensor, add: Tensor, threshold: float = 128.0) -> Tensor:
    """Add `add` (b,) 0..255 levels to the pixels below `threshold`, clipped (timm's SolarizeAdd)."""
    return torch.where(_to_uint8(x) < threshold, (x + _per_sample(add) / 255.0).clamp(max=1.0), x)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` (b,) bits of each 8-bit level; 8 = identity, 0 = black."""
    drop = (8 - bits.long()).clamp(0, 8)  # (b,)
    keep = 255 - ((1 << drop) - 1)  # (b,) bit mask
    return (_to_uint8(x) & _per_sample(keep)).to(x.dtype) / 255.0


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with black: factor (b,) 1 = identity, 0 = black."""
    return _blend(torch.zeros_like(x), x, factor)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's mean grey level: factor (b,) 1 = identity, 0 = flat grey."""
    mean = _grey(x).mean((1, 2, 3), keepdim=True)  # (b, 1, 1, 1)
    return _blend(mean.expand_as(x), x, factor)


def color(x: Tensor, factor: Tensor) -> Tensor:
    """Saturation: blend with the grey image, factor (b,) 1 = identity, 0 = grey; identity for C = 1."""
    if x.shape[1] == 1:
        return x
    return _blend(_grey(x).expand_as(x), x, factor)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with Pillow's SMOOTH-filtered image (border pixels kept): factor (b,) 1 = identity, >1 sharper."""
    c = x.shape[1]
    if min(x.shape[-2:]) < 3:
        return x
    kernel = x.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)  # (b, C, H-2, W-2)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def affine(x: Tensor, matrix: Tensor, fill: Tensor) -> Tensor:
    """Resample each image by a (b, 2, 3) map from output to input pixel coordinates (Pillow's AFFINE).

    Coordinates are continuous with pixel edges at integers (centres at i + 0.5), as in Pillow;
    bilinear; areas from outside the image take `fill` (C,).
    """
    b, c, h, w = x.shape
    to_norm = x.new_tensor([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0], [0.0, 0.0, 1.0]])  # pixel -> [-1, 1]
    from_norm = torch.linalg.inv(to_norm)
    full = torch.cat([matrix, x.new_tensor([0.0, 0.0, 1.0]).expand(b, 1, 3)], 1)  # (b, 3, 3)
    theta = (to_norm @ full @ from_norm)[:, :2]  # (b, 2, 3) in affine_grid's normalised coordinates
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)  # (b, H, W, 2)
    fill = fill.view(1, c, 1, 1)
    # sampling x - fill with zero padding, then adding fill back, fills the outside with `fill`
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return out.clamp(0.0, 1.0)


def _affine_rows(a: Tensor, b_: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    """Six (b,) coefficients -> (b, 2, 3) matrices [[a, b, c], [d, e, f]]."""
    return torch.stack([torch.stack([a, b_, c], 1), torch.stack([d, e, f], 1)], 1)


def rotate(x: Tensor, degrees: Tensor, fill: Tensor) -> Tensor:
    """Rotate counter-clockwise by `degrees` (b,) about the image centre (Pillow's rotate)."""
    h, w = x.shape[-2:]
    a = -torch.deg2rad(degrees.to(x.dtype))
    cos, sin = a.cos(), a.sin()
    cx, cy = w / 2.0, h / 2.0
    # input = R (output - centre) + centre
    tx = cx - cos * cx - sin * cy
    ty = cy + sin * cx - cos * cy
    return affine(x, _affine_rows(cos, sin, tx, -sin, cos, ty), fill)


def shear_x(x: Tensor, factor: Tensor, fill: Tensor) -> Tensor:
    """Horizontal shear about the top-left corner: output (u, v) <- input (u + factor v, v) (timm's ShearX)."""
    one, zero = torch.ones_like(factor, dtype=x.dtype), torch.zeros_like(factor, dtype=x.dtype)
    return affine(x, _affine_rows(one, factor.to(x.dtype), zero, zero, one, zero), fill)


def shear_y(x: Tensor, factor: Tensor, fill: Tensor) -> Tensor:
    """Vertical shear about the top-left corner: output (u, v) <- input (u, v + factor u)."""
    one, zero = torch.ones_like(factor, dtype=x.dtype), torch.zeros_like(factor, dtype=x.dtype)
    return affine(x, _affine_rows(one, zero, zero, factor.to(x.dtype), one, zero), fill)


def translate_x(x: Tensor, fraction: Tensor, fill: Tensor) -> Tensor:
    """Shift left by fraction (b,) of the width (negative: right)."""
    one, zero = torch.ones_like(fraction, dtype=x.dtype), torch.zeros_like(fraction, dtype=x.dtype)
    return affine(x, _affine_rows(one, zero, fraction.to(x.dtype) * x.shape[-1], zero, one, zero), fill)


def translate_y(x: Tensor, fraction: Tensor, fill: Tensor) -> Tensor:
    """Shift up by fraction (b,) of the height (negative: down)."""
    one, zero = torch.ones_like(fraction, dtype=x.dtype), torch.zeros_like(fraction, dtype=x.dtype)
    return affine(x, _affine_rows(one, zero, zero, zero, one, fraction.to(x.dtype) * x.shape[-2]), fill)


# name -> f(x (b, C, H, W), m (b,) magnitude in [0, 10], sign (b,) +-1, fill (C,)): timm's level
# mapping with the 'increasing' variants, so magnitude 0 is the identity for every signed op.
OpFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
_OPS: dict[str, OpFn] = {
    "Identity": lambda x, m, s, fill: x,
    "AutoContrast": lambda x, m, s, fill: autocontrast(x),
    "Equalize": lambda x, m, s, fill: equalize(x),
    "Invert": lambda x, m, s, fill: invert(x),
    "Rotate": lambda x, m, s, fill: rotate(x, s * m / MAX_MAGNITUDE * 30.0, fill),  # up to 30 degrees
    "Solarize": lambda x, m, s, fill: solarize(x, 256.0 - (m / MAX_MAGNITUDE * 256.0).floor()),
    "SolarizeAdd": lambda x, m, s, fill: solarize_add(x, (m / MAX_MAGNITUDE * 110.0).floor()),
    "Posterize": lambda x, m, s, fill: posterize(x, 4 - (m / MAX_MAGNITUDE * 4.0).floor()),  # 4 bits -> 0
    "Color": lambda x, m, s, fill: color(x, 1.0 + s * m / MAX_MAGNITUDE * 0.9),  # factor in [0.1, 1.9]
    "Contrast": lambda x, m, s, fill: contrast(x, 1.0 + s * m / MAX_MAGNITUDE * 0.9),
    "Brightness": lambda x, m, s, fill: brightness(x, 1.0 + s * m / MAX_MAGNITUDE * 0.9),
    "Sharpness": lambda x, m, s, fill: sharpness(x, 1.0 + s * m / MAX_MAGNITUDE * 0.9),
    "ShearX": lambda x, m, s, fill: shear_x(x, s * m / MAX_MAGNITUDE * 0.3, fill),
    "ShearY": lambda x, m, s, fill: shear_y(x, s * m / MAX_MAGNITUDE * 0.3, fill),
    "TranslateX": lambda x, m, s, fill: translate_x(x, s * m / MAX_MAGNITUDE * 0.45, fill),  # of the width
    "TranslateY": lambda x, m, s, fill: translate_y(x, s * m / MAX_MAGNITUDE * 0.45, fill),
}
OP_NAMES = tuple(_OPS)


def _fill_tensor(fill: float | Sequence[float], x: Tensor) -> Tensor:
    """fill as a (C,) tensor on x's device (one value is used for every channel)."""
    values = [float(fill)] if isinstance(fill, (int, float)) else [float(v) for v in fill]
    if len(values) not in (1, x.shape[1]):
        raise ValueError(f"fill has {len(values)} values for {x.shape[1]} channels")
    return x.new_tensor(values).expand(x.shape[1]).contiguous()


def apply_op(
    images: Tensor,
    name: str,
    magnitude: float | Tensor,
    sign: float | Tensor = 1.0,
    fill: float | Sequence[float] = 0.5,
) -> Tensor:
    """One RandAugment op on every image of (b, C, H, W) in [0, 1] at magnitude (0-10, scalar or (b,))."""
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; choose from {', '.join(OP_NAMES)}")
    b = images.shape[0]
    m = torch.as_tensor(magnitude, dtype=images.dtype, device=images.device).expand(b)
    s = torch.as_tensor(sign, dtype=images.dtype, device=images.device).expand(b)
    return _OPS[name](images, m, s, _fill_tensor(fill, images))


def rand_augment(
    images: Tensor,
    num_ops: int,
    magnitude: float,
    generator: torch.Generator,
    *,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
    ops: Sequence[str] = RAND_OPS,
    fill: float | Sequence[float] = 0.5,
) -> Tensor:
    """RandAugment per sample on (B, C, H, W) pixels in [0, 1] -> (B, C, H, W) in [0, 1].

    Each image draws `num_ops` ops uniformly (with replacement) and applies each with probability
    `prob` (timm: 0.5), at magnitude N(magnitude, magnitude_std) clipped to [0, 10] and a random
    sign for the signed ops. Batched: each (layer, op) pair runs once on the images that drew it.
    Geometric ops fill uncovered areas with `fill` (per channel; timm uses the dataset mean).
    """
    unknown = [n for n in ops if n not in _OPS]
    if unknown:
        raise ValueError(f"unknown RandAugment ops {unknown}; choose from {', '.join(OP_NAMES)}")
    B = images.shape[0]
    if num_ops <= 0 or B == 0 or not ops:
        return images
    choice = (_rand((B, num_ops), generator) * len(ops)).long().clamp(max=len(ops) - 1)  # (B, n) op index
    applied = _rand((B, num_ops), generator) < prob  # (B, n)
    mags = torch.full((B, num_ops), float(magnitude))
    if magnitude_std > 0:
        mags = mags + magnitude_std * _randn((B, num_ops), generator)
    mags = mags.clamp(0.0, MAX_MAGNITUDE).to(images.dtype)  # (B, n)
    signs = torch.where(_rand((B, num_ops), generator) < 0.5, -1.0, 1.0).to(images.dtype)  # (B, n)
    fill_t = _fill_tensor(fill, images)
    out = images.clone()
    for layer in range(num_ops):  # layers in order: the second op sees the first's output
        for k, name in enumerate(ops):
            idx = ((choice[:, layer] == k) & applied[:, layer]).nonzero().squeeze(1)  # (b,)
            if idx.numel() == 0 or name == "Identity":
                continue
            m, s = mags[idx, layer].to(images.device), signs[idx, layer].to(images.device)
            idx = idx.to(images.device)
            out[idx] = _OPS[name](out[idx], m, s, fill_t)
    return out


# ---------------------------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------------------------


def erasing_boxes(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> Tensor:
    """n random-erasing boxes (top, left, h, w) as int64 (n, 4); h = 0 where none of 10 tries fit.

    timm's rule: a target area uniform in `area` x image area and a log-uniform aspect ratio,
    rounded to h, w; a try fits when h < H and w < W (and, here, h * w / (H W) stays inside
    `area`, so the rounding never breaks the bound); the first fit wins, at a uniform position.
    """
    tries = 10
    target = height * width * (area[0] + (area[1] - area[0]) * _rand((n, tries), generator))  # (n, tries)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = (log_lo + (log_hi - log_lo) * _rand((n, tries), generator)).exp()
    h = (target * aspect).sqrt().round().long()  # (n, tries)
    w = (target / aspect).sqrt().round().long()
    frac = (h * w).double() / (height * width)
    fits = (h > 0) & (w > 0) & (h < height) & (w < width) & (frac >= area[0]) & (frac <= area[1])
    first = fits.long().argmax(1, keepdim=True)  # (n, 1)
    h = torch.where(fits.any(1), h.gather(1, first).squeeze(1), 0)  # (n,)
    w = torch.where(fits.any(1), w.gather(1, first).squeeze(1), 0)
    u = _rand((n, 2), generator)
    top = (u[:, 0] * (height - h + 1)).long().clamp(max=height - h)  # uniform in [0, H - h]
    left = (u[:, 1] * (width - w + 1)).long().clamp(max=width - w)
    return torch.stack([top, left, h, w], 1)  # (n, 4)


def random_erasing(
    images: Tensor,
    prob: float,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> Tensor:
    """With probability `prob` per sample, replace one rectangle of (B, C, H, W) normalised images by N(0, 1) noise.

    timm's RandomErasing in 'pixel' mode with one box; the input is not modified.
    """
    B, C, H, W = images.shape
    if prob <= 0 or B == 0:
        return images
    erase = _rand((B,), generator) < prob  # (B,)
    boxes = erasing_boxes(B, H, W, generator, area, ratio)  # (B, 4)
    out = images.clone()
    for i in erase.nonzero().squeeze(1).tolist():
        top, left, h, w = boxes[i].tolist()
        if h == 0:
            continue
        noise = torch.randn((C, h, w), generator=generator, device=generator.device)  # (C, h, w)
        out[i, :, top : top + h, left : left + w] = noise.to(out)
    return out


# ---------------------------------------------------------------------------------------------
# The fine-tuning recipe
# ---------------------------------------------------------------------------------------------


class FinetuneAugment:
    """The MAE fine-tuning augmentation of a normalised batch: RandAugment, random erasing, mixup / CutMix.

    Call on each training batch after the loader: `images, targets = aug(images, labels, generator)`,
    then train with `soft_target_cross_entropy(model(images), targets)`.
    """

    def __init__(
        self,
        cfg: AugConfig,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        magnitude_std: float = 0.5,
        switch_prob: float = 0.5,
        ops: Sequence[str] = RAND_OPS,
    ):
        if num_classes <= 0:
            raise ValueError(f"fine-tuning needs labelled data (num_classes > 0), got {num_classes}")
        if not 0 <= cfg.randaug_magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"--aug.randaug_magnitude must be in [0, 10], got {cfg.randaug_magnitude}")
        self.cfg, self.num_classes = cfg, int(num_classes)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.magnitude_std, self.switch_prob, self.ops = magnitude_std, switch_prob, tuple(ops)

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) normalised images, (B,) labels -> augmented normalised images, (B, K) soft targets."""
        cfg = self.cfg
        if cfg.randaug_ops > 0:
            pixels = denormalize(images, self.mean, self.std).clamp(0.0, 1.0)  # (B, C, H, W) in [0, 1]
            pixels = rand_augment(
                pixels, cfg.randaug_ops, cfg.randaug_magnitude, generator,
                magnitude_std=self.magnitude_std, ops=self.ops, fill=self.mean,
            )
            images = normalize(pixels, self.mean, self.std)
        images = random_erasing(images, cfg.reprob, generator)
        return mixup_cutmix(
            images, labels, self.num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
            prob=cfg.mix_prob, switch_prob=self.switch_prob, smoothing=cfg.smoothing, generator=generator,
        )


__all__ = [
    "OP_NAMES",
    "RAND_OPS",
    "TIMM_OPS",
    "FinetuneAugment",
    "apply_op",
    "cutmix_box",
    "erasing_boxes",
    "mixup_cutmix",
    "rand_augment",
    "random_erasing",
    "sample_beta",
    "smooth_one_hot",
    "soft_target_cross_entropy",
]
