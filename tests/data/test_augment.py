"""Properties of the fine-tuning augmentations: mixup / CutMix targets, soft-target loss, RandAugment ops, erasing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fastmae.config import AugConfig
from fastmae.data import denormalize, normalize
from fastmae.data.augment import (
    OP_NAMES,
    TIMM_OPS,
    FinetuneAugment,
    apply_op,
    equalize,
    erasing_boxes,
    mixup_cutmix,
    rand_augment,
    random_erasing,
    rotate,
    smooth_one_hot,
    soft_target_cross_entropy,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def two_constant_images(H: int = 24, W: int = 20) -> torch.Tensor:
    """(2, 1, H, W): sample 0 all zeros, sample 1 all ones."""
    return torch.stack([torch.zeros(1, H, W), torch.ones(1, H, W)])


# ---------------------------------------------------------------------------------------------
# mixup / CutMix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_soft_targets_sum_to_one(mixup_alpha, cutmix_alpha):
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 2])
    for seed in range(5):
        _, t = mixup_cutmix(x, y, 5, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, generator=gen(seed))
        assert t.shape == (6, 5)
        torch.testing.assert_close(t.sum(1), torch.ones(6))
        assert (t >= 0).all()


def test_cutmix_target_weight_is_pasted_area():
    x, y = two_constant_images(), torch.tensor([0, 1])
    seen = set()
    for seed in range(20):
        mixed, t = mixup_cutmix(x, y, 2, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0, generator=gen(seed))
        pasted = mixed[0].sum().item() / mixed[0].numel()  # ones pasted into the zero image
        assert t[0, 1].item() == pytest.approx(pasted, abs=1e-6)
        assert t[1, 0].item() == pytest.approx((1 - mixed[1]).sum().item() / mixed[1].numel(), abs=1e-6)
        # a single rectangle: the ones form a box
        rows, cols = mixed[0, 0].nonzero().unbind(1)
        if rows.numel():
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box.item() == rows.numel()
        seen.add(round(pasted, 3))
    assert len(seen) > 5
    assert torch.equal(x, two_constant_images())  # inputs untouched


def test_mixup_image_is_convex_combination_with_target_lambda():
    K, s = 5, 0.1
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, t = mixup_cutmix(x, y, K, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=s, generator=gen(3))
    lam = (t[0, 0].item() - s / K) / (1 - s)  # labels of 0 and its partner 3 differ
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(t[0, 3], torch.tensor((1 - lam) * (1 - s) + s / K))
    torch.testing.assert_close(t[0, 1], torch.tensor(s / K))


def test_smoothing_values_and_identity_when_off():
    x, y, K, s = torch.randn(3, 1, 8, 8), torch.tensor([2, 0, 1]), 4, 0.1
    for kw in ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.0}):
        mixed, t = mixup_cutmix(x, y, K, smoothing=s, generator=gen(), **kw)
        assert torch.equal(mixed, x)
        expected = torch.full((3, K), s / K)
        expected[torch.arange(3), y] = 1 - s + s / K
        torch.testing.assert_close(t, expected)
    torch.testing.assert_close(smooth_one_hot(y, K, 0.0), F.one_hot(y, K).float())


def test_mixup_cutmix_reproducible_from_generator():
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
    kw = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}
    a = mixup_cutmix(x, y, 3, generator=gen(7), **kw)
    b = mixup_cutmix(x, y, 3, generator=gen(7), **kw)
    c = mixup_cutmix(x, y, 3, generator=gen(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    state = torch.random.get_rng_state()
    mixup_cutmix(x, y, 3, generator=gen(9), **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is not used


def test_both_modes_occur_with_switch():
    x, y = two_constant_images(), torch.tensor([0, 1])
    cut = mix = 0
    for seed in range(30):
        mixed, _ = mixup_cutmix(x, y, 2, mixup_alpha=0.8, cutmix_alpha=1.0, generator=gen(seed))
        values = mixed[0].unique()
        if ((values == 0) | (values == 1)).all():
            cut += 1
        else:
            mix += 1
    assert cut > 5 and mix > 5


# ---------------------------------------------------------------------------------------------
# soft-target cross-entropy
# ---------------------------------------------------------------------------------------------


def test_soft_target_cross_entropy_matches_cross_entropy():
    logits, y, K = torch.randn(7, 5), torch.tensor([0, 4, 2, 2, 1, 3, 0]), 5
    torch.testing.assert_close(soft_target_cross_entropy(logits, F.one_hot(y, K).float()), F.cross_entropy(logits, y))
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, smooth_one_hot(y, K, 0.1)), F.cross_entropy(logits, y, label_smoothing=0.1)
    )


# ---------------------------------------------------------------------------------------------
# RandAugment ops
# ---------------------------------------------------------------------------------------------

IDENTITY_AT_ZERO = ("Identity", "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY",
                    "Brightness", "Contrast", "Color", "Sharpness", "Solarize")


@pytest.mark.parametrize("C", [1, 3, 4])
@pytest.mark.parametrize("name", OP_NAMES)
def test_op_keeps_shape_and_range(name, C):
    x = torch.rand(3, C, 12, 10)
    for m in (0.0, 5.0, 10.0):
        for sign in (-1.0, 1.0):
            out = apply_op(x, name, m, sign, fill=0.5)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert out.min() >= 0 and out.max() <= 1
            if name in IDENTITY_AT_ZERO and m == 0:
                torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
            if name not in ("Identity", "Color") and m == 10.0 and not (C == 1 and name == "Color"):
                assert not torch.allclose(out, x), name  # the op does something at full magnitude


def test_color_is_identity_on_one_channel():
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(apply_op(x, "Color", 10.0), x)
    assert not torch.allclose(apply_op(torch.rand(2, 3, 8, 8), "Color", 10.0, -1.0), torch.rand(2, 3, 8, 8))


def test_geometric_ops_move_pixels_as_expected():
    x = torch.zeros(1, 1, 10, 10)
    x[..., 2, 3] = 1.0
    # translate left by 0.2 * width = 2 pixels (magnitude 10 -> 0.45; use the op directly via magnitude)
    out = apply_op(x, "TranslateX", 10 * 0.2 / 0.45, 1.0, fill=0.0)
    assert out[0, 0, 2, 1].item() == pytest.approx(1.0, abs=1e-5)
    out = apply_op(x, "TranslateY", 10 * 0.2 / 0.45, -1.0, fill=0.0)  # down by 2
    assert out[0, 0, 4, 3].item() == pytest.approx(1.0, abs=1e-5)
    # 90 degrees counter-clockwise about the centre is exact on a square image (Pillow's direction)
    img = torch.rand(2, 3, 10, 10)
    torch.testing.assert_close(rotate(img, torch.tensor([90.0, 90.0]), torch.zeros(3)), torch.rot90(img, 1, (2, 3)))
    # fill: the uncovered strip takes the fill value
    out = apply_op(torch.zeros(1, 2, 10, 10), "TranslateX", 10.0, 1.0, fill=(0.25, 0.75))
    torch.testing.assert_close(out[0, :, :, -1], torch.tensor([0.25, 0.75]).view(2, 1).expand(2, 10))


def test_equalize_flattens_the_histogram_of_a_ramp():
    x = (torch.linspace(0, 1, 128 * 128) ** 3).view(1, 1, 128, 128)  # a skewed ramp: most pixels dark
    out = equalize(x)
    counts = torch.histc(out, bins=8, min=0, max=1)
    expected = x.numel() / 8
    assert ((counts - expected).abs() < 0.1 * expected).all(), counts
    assert out.min() == 0 and out.max() == 1
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert torch.equal(equalize(flat), (flat * 255).round() / 255)  # a constant channel is left alone


def test_equalize_matches_pillow():
    x = torch.rand(2, 3, 20, 30) ** 2
    ours = (equalize(x) * 255).round().to(torch.uint8)
    for i in range(2):
        pixels = (x[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
        pil = torch.from_numpy(np.array(ImageOps.equalize(Image.fromarray(pixels)))).permute(2, 0, 1)
        assert torch.equal(ours[i], pil)


def test_autocontrast_stretches_each_channel():
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.2
    out = apply_op(x, "AutoContrast", 0.0)
    torch.testing.assert_close(out.amin((2, 3)), torch.zeros(2, 3))
    torch.testing.assert_close(out.amax((2, 3)), torch.ones(2, 3))


def test_posterize_and_solarize_levels():
    x = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16) / 255
    post = apply_op(x, "Posterize", 9.0)  # 4 - int(3.6) = 1 bit: 0 or 128
    assert set((post * 255).round().unique().tolist()) == {0.0, 128.0}
    sol = apply_op(x, "Solarize", 5.0)  # threshold 256 - 128 = 128
    levels = (sol * 255).round().view(-1)
    assert torch.equal(levels[:128], torch.arange(128.0)) and torch.equal(levels[128:], 255 - torch.arange(128.0, 256))


@pytest.mark.parametrize("ops", ["paper", "timm"])
def test_rand_augment_shape_range_reproducible(ops):
    kw = {} if ops == "paper" else {"ops": TIMM_OPS}
    x = torch.rand(32, 3, 16, 16)
    a = rand_augment(x, 2, 9, gen(1), **kw)
    b = rand_augment(x, 2, 9, gen(1), **kw)
    c = rand_augment(x, 2, 9, gen(2), **kw)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a - x).abs().flatten(1).amax(1) > 1e-4
    assert 0 < changed.sum() < 32  # each op applies with probability 0.5; Identity exists
    assert torch.equal(rand_augment(x, 0, 9, gen(1)), x)
    assert torch.equal(x, x.clone())


def test_rand_augment_is_per_sample():
    x = torch.rand(1, 3, 16, 16).expand(16, 3, 16, 16).contiguous()
    out = rand_augment(x, 2, 9, gen(0))
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) > 4


# ---------------------------------------------------------------------------------------------
# random erasing
# ---------------------------------------------------------------------------------------------


def test_random_erasing_changes_one_rectangle_within_area():
    B, C, H, W = 64, 3, 28, 24
    x = torch.full((B, C, H, W), 100.0)  # noise is N(0, 1): never 100
    out = random_erasing(x, 0.5, gen(0))
    erased = 0
    for i in range(B):
        diff = (out[i] != x[i]).all(0)  # (H, W): all channels replaced
        assert torch.equal(diff, (out[i] != x[i]).any(0))
        if not diff.any():
            continue
        erased += 1
        rows, cols = diff.nonzero().unbind(1)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert (h * w).item() == rows.numel()  # exactly one filled rectangle
        assert 0.02 <= rows.numel() / (H * W) <= 1 / 3
        assert h < H and w < W
    assert 15 < erased < 50
    assert torch.equal(random_erasing(x, 0.0, gen(0)), x)
    assert torch.equal(random_erasing(x, 0.5, gen(0)), out)  # reproducible
    assert (x == 100).all()  # input untouched


def test_erasing_boxes_respect_bounds():
    boxes = erasing_boxes(500, 28, 28, gen(1))
    top, left, h, w = boxes.unbind(1)
    ok = h > 0
    frac = (h * w)[ok].double() / (28 * 28)
    assert ok.float().mean() > 0.95
    assert (frac >= 0.02).all() and (frac <= 1 / 3).all()
    assert (top + h <= 28).all() and (left + w <= 28).all() and (top >= 0).all() and (left >= 0).all()


# ---------------------------------------------------------------------------------------------
# the composed recipe
# ---------------------------------------------------------------------------------------------


def test_finetune_augment_composes_and_is_reproducible():
    mean, std = (0.2860,), (0.3530,)
    x01 = torch.rand(16, 1, 28, 28)
    x, y = normalize(x01, mean, std), torch.arange(16) % 10
    aug = FinetuneAugment(AugConfig(), 10, mean, std)
    a_img, a_t = aug(x, y, gen(0))
    b_img, b_t = aug(x, y, gen(0))
    assert a_img.shape == x.shape and a_t.shape == (16, 10)
    assert torch.equal(a_img, b_img) and torch.equal(a_t, b_t)
    torch.testing.assert_close(a_t.sum(1), torch.ones(16))
    assert not torch.equal(aug(x, y, gen(1))[0], a_img)

    off = FinetuneAugment(AugConfig(mixup=0, cutmix=0, smoothing=0, randaug_ops=0, reprob=0), 10, mean, std)
    img, t = off(x, y, gen(0))
    assert torch.equal(img, x) and torch.equal(t, F.one_hot(y, 10).float())

    ra_only = FinetuneAugment(AugConfig(mixup=0, cutmix=0, reprob=0, randaug_magnitude=0), 10, mean, std)
    img, _ = ra_only(x, y, gen(0))  # magnitude 0 (std 0.5 noise) keeps pixel range after de/re-normalising
    pixels = denormalize(img, mean, std)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
