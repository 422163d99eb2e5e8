"""Pure training pieces: lr schedule, weight-decay and layer-decay groups, LARS, kNN."""

from __future__ import annotations

import math

import pytest
import torch

from fastmae.config import OptimConfig
from fastmae.metrics.knn import knn_accuracy, knn_scores
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.vit import VisionTransformer
from fastmae.train.optim import (
    LARS,
    layer_id,
    lr_at,
    param_groups_lrd,
    param_groups_weight_decay,
    scaled_lr,
    schedule,
)
from tests.conftest import TINY_MAE


def test_lr_schedule_warmup_peak_and_end():
    total, warm, peak, low = 1000, 100, 1e-3, 1e-5
    assert lr_at(0, total, warm, peak, low) == 0.0
    assert lr_at(50, total, warm, peak, low) == pytest.approx(peak / 2)
    assert lr_at(100, total, warm, peak, low) == pytest.approx(peak)
    assert lr_at(550, total, warm, peak, low) == pytest.approx((peak + low) / 2)
    assert lr_at(1000, total, warm, peak, low) == pytest.approx(low)
    lrs = [lr_at(s, total, warm, peak, low) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:101]))  # rising in warmup
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # falling after
    assert lr_at(500, total, 0, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_step_schedule_drops_tenfold_at_each_milestone():
    """--optim.milestones (epochs) become steps; warmup still comes first (mmpose: linear warmup, MultiStepLR)."""
    s = schedule(OptimConfig(epochs=10, warmup_epochs=1, batch_size=64, blr=4e-3, milestones=(6.0, 8.5)), 10)
    assert (s.warmup, s.milestones, s.peak) == (10, (60, 85), pytest.approx(1e-3))
    assert s(5) == pytest.approx(5e-4)
    assert [s(t) for t in (10, 59, 60, 84, 85, 99)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


def test_scaled_lr_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1.5e-4, 4096, lr=1e-3) == 1e-3


def test_weight_decay_groups():
    m = MaskedAutoencoderViT(**TINY_MAE)
    no_decay, decay = param_groups_weight_decay(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    dd = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= nd
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= dd
    # frozen sin-cos embeddings are not optimised at all
    assert "pos_embed" not in nd | dd and "decoder_pos_embed" not in nd | dd
    assert nd | dd == {n for n, p in m.named_parameters() if p.requires_grad}


def test_layer_decay_scales_per_depth():
    v = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=5)
    groups = param_groups_lrd(v, 0.05, layer_decay=0.5)
    num_layers = 4
    by_name = {}
    for g in groups:
        for p in g["params"]:
            by_name[next(n for n, q in v.named_parameters() if q is p)] = g
    assert layer_id("cls_token", num_layers) == 0 and layer_id("blocks.2.mlp.fc1.weight", num_layers) == 3
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5**4)
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5**3)
    assert by_name["blocks.2.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5**1)
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["fc_norm.weight"]["lr_scale"] == 1.0
    assert by_name["head.bias"]["weight_decay"] == 0.0 and by_name["head.weight"]["weight_decay"] == 0.05


def test_lars_matches_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = LARS([w, b], lr=0.1, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(3, 4), torch.randn(4)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    dw = gw + 0.01 * w0
    q = 0.001 * w0.norm() / dw.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.1 * dw * q)
    torch.testing.assert_close(b.detach(), b0 - 0.1 * gb)  # 1-D: no decay, no trust ratio
    # second step uses momentum
    w1 = w.detach().clone()
    w.grad = gw.clone()
    opt.step()
    dw2 = (gw + 0.01 * w1) * (0.001 * w1.norm() / (gw + 0.01 * w1).norm())
    torch.testing.assert_close(w.detach(), w1 - 0.1 * (0.9 * dw * q + dw2))


def test_knn_exact_on_toy_problem():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    scores = knn_scores(train, labels, test, num_classes=2, k=2, temperature=0.1)
    assert scores.argmax(1).tolist() == [0, 1]
    # the vote of test 0 is exp(cos/T) summed over its two nearest (both class 0), scaled by exp(-max cos/T)
    cos = torch.nn.functional.normalize(train[:2], dim=1) @ torch.nn.functional.normalize(test[0], dim=0)
    assert scores[0, 0].item() == pytest.approx(((cos - cos.max()) / 0.1).exp().sum().item(), rel=1e-5)
    assert scores[0, 1].item() == 0.0
    acc = knn_accuracy(train, labels, test, torch.tensor([0, 1]), num_classes=2, k=2)
    assert acc["top1"] == 100.0
    acc = knn_accuracy(train, labels, test, torch.tensor([1, 0]), num_classes=2, k=2)
    assert acc["top1"] == 0.0


def test_knn_small_temperature_does_not_overflow():
    """exp(sim/T) overflows float32 for T=0.001 (every score inf, chance accuracy); the stable form does not."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(25)  # (100,)
    train = centres[labels] + torch.randn(100, 16, generator=g)
    test_labels = torch.arange(4).repeat_interleave(10)
    test = centres[test_labels] + torch.randn(40, 16, generator=g)
    accs = [knn_accuracy(train, labels, test, test_labels, num_classes=4, k=20, temperature=t)["top1"]
            for t in (0.07, 0.001, 1e-5)]
    assert accs[0] > 90 and accs[1] == accs[0] and accs[2] >= 90, accs
    assert torch.isfinite(knn_scores(train, labels, test, num_classes=4, temperature=1e-5)).all()


def test_two_adamw_steps_lower_the_loss_on_a_fixed_batch():
    from fastmae.train.optim import build_adamw

    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY_MAE, norm_pix_loss=True)
    x = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 64)  # the same mask every step: only the weights change
    opt = build_adamw(param_groups_weight_decay(m, 0.05), 1e-3, (0.9, 0.95), torch.device("cpu"))
    losses = []
    for _ in range(3):
        loss = m(x, 0.75, noise=noise)[0]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[2] < losses[1] < losses[0]
