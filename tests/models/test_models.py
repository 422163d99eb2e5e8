"""Model behaviour: every variant trains at tiny size, loss only on removed patches, clear errors."""

from __future__ import annotations

import pytest
import torch

from fastmae.api import encode
from fastmae.models.mae import MAE_VARIANTS, MaskedAutoencoderViT, build_mae
from fastmae.models.vit import VARIANTS, VisionTransformer, build_vit
from tests.conftest import TINY_MAE


def _tiny_overrides(kw: dict) -> dict:
    """Shrink a variant to a few layers while keeping its patch size and head structure."""
    heads = kw["num_heads"]
    return dict(embed_dim=4 * heads * 2, depth=1, img_size=2 * kw["patch_size"])


@pytest.mark.parametrize("name", sorted(MAE_VARIANTS))
def test_every_mae_variant_forward_backward(name):
    kw = MAE_VARIANTS[name]
    dec_heads = kw["decoder_num_heads"]
    m = build_mae(name, **_tiny_overrides(kw), decoder_embed_dim=4 * dec_heads, decoder_depth=1, in_chans=2,
                  norm_pix_loss=True)
    x = torch.randn(2, 2, m.patch_embed.img_size[0], m.patch_embed.img_size[1])
    loss, pred, mask = m(x, mask_ratio=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert pred.shape == (2, 4, kw["patch_size"] ** 2 * 2)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_vit_variant_forward_backward(name):
    kw = VARIANTS[name]
    v = build_vit(name, **_tiny_overrides(kw), num_classes=3, drop_path_rate=0.1)
    x = torch.randn(2, 3, v.patch_embed.img_size[0], v.patch_embed.img_size[1])
    out = v(x)
    out.sum().backward()
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_real_variant_sizes():
    # parameter counts of the paper's encoders (timm's ViT-B/16 has 86.6M with a 1000-class head)
    v = build_vit("vit_base_patch16", num_classes=1000)
    assert abs(sum(p.numel() for p in v.parameters()) / 1e6 - 86.6) < 0.1
    m = build_mae("mae_vit_base_patch16")
    assert m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8


def test_loss_has_zero_gradient_at_kept_patches():
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY_MAE, norm_pix_loss=True)
    x = torch.randn(2, 3, 32, 32)
    latent, mask, ids = m.forward_encoder(x, 0.75)
    pred = m.forward_decoder(latent, ids).detach().requires_grad_(True)
    m.forward_loss(x, pred, mask).backward()
    kept = mask == 0
    assert (pred.grad[kept] == 0).all()
    assert (pred.grad[~kept].abs().sum(-1) > 0).all()


def test_loss_ignores_kept_patches_values():
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY_MAE)
    x = torch.randn(1, 3, 32, 32)
    _, pred, mask = m(x, 0.75)
    pred2 = pred.detach().clone()
    pred2[mask == 0] += 100.0  # garbage at visible patches does not change the loss
    assert torch.equal(m.forward_loss(x, pred.detach(), mask), m.forward_loss(x, pred2, mask))


def test_norm_pix_target_is_normalised_per_patch():
    m = MaskedAutoencoderViT(**TINY_MAE, norm_pix_loss=True)
    t = m.target(torch.rand(2, 3, 32, 32) * 5 + 3)
    assert t.mean(-1).abs().max() < 1e-4
    assert (t.var(-1) - 1).abs().max() < 1e-3


def test_non_square_and_multichannel_mae():
    m = MaskedAutoencoderViT(img_size=(16, 24), patch_size=4, in_chans=5, embed_dim=32, depth=1, num_heads=2,
                             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    x = torch.randn(2, 5, 16, 24)
    loss, pred, mask = m(x)
    assert pred.shape == (2, 24, 80) and mask.shape == (2, 24)
    assert m.unpatchify(m.patchify(x)).equal(x)


def test_dense_feature_map_shape():
    v = VisionTransformer(img_size=(16, 24), patch_size=4, in_chans=1, num_classes=0, embed_dim=32, depth=1,
                          num_heads=2)
    x = torch.randn(2, 1, 16, 24)
    assert encode(v, x, "dense").shape == (2, 32, 4, 6)
    assert v.forward_features(x).shape == (2, 1 + 4 * 6, 32)  # timm-style: tokens
    assert v.forward_head(v.forward_features(x), pre_logits=True).shape == (2, 32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img_size=30), "not divisible by the patch size"),
        (dict(embed_dim=66), "divisible by the number of heads"),
        (dict(embed_dim=18, num_heads=3), "divisible by 4"),
        (dict(decoder_embed_dim=30, decoder_num_heads=3), "divisible by 4"),
        (dict(decoder_embed_dim=32, decoder_num_heads=3), "divisible by the number of heads"),
    ],
)
def test_bad_model_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedAutoencoderViT(**{**TINY_MAE, **kwargs})


def test_bad_input_errors():
    m = MaskedAutoencoderViT(**TINY_MAE)
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="differs from the model"):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="mask_ratio"):
        m(torch.randn(1, 3, 32, 32), mask_ratio=1.0)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="vit_base_patch16"):
        build_vit("vit_gigantic_patch16")


def test_cpu_bf16_attention_path_matches_sdpa():
    import torch.nn.functional as F

    from fastmae.models.vit import attention

    q, k, v = (torch.randn(2, 3, 17, 16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()  # the explicit-matmul path
    assert (out - ref).abs().max() < 0.05
    assert torch.equal(attention(q, k, v), ref)  # fp32 keeps SDPA, so fp32 parity is untouched
