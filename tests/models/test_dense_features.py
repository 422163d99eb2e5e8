"""Multi-layer dense features at any multiple of the patch size (`encode(..., 'dense', layers)`,
`forward_intermediates`), and the conv patch embedding as unfold + matmul (the ViT-from-scratch pieces)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmae import encode
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.pos_embed import resample_pos_embed
from fastmae.models.vit import VisionTransformer, encoder_tokens, pos_embed_for

KW = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=2)


def _vit(pool: str = "token") -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**KW, num_classes=0, global_pool=pool).eval()


def _mae() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**KW, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).eval()


@pytest.mark.parametrize("make", [_vit, _mae])
@pytest.mark.parametrize("size", [(16, 16), (24, 24), (12, 20), (32, 8)])
def test_dense_layers_shapes(make, size):
    model = make()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        maps = encode(model, x, "dense", layers=(0, -2, -1))
    assert isinstance(maps, list) and len(maps) == 3
    for m in maps:
        assert m.shape == (2, 32, size[0] // 4, size[1] // 4)
    single = encode(model, x, "dense")  # layers None: one tensor, the last block
    assert torch.is_tensor(single) and torch.equal(single, maps[-1])


@pytest.mark.parametrize("make", [_vit, _mae])
def test_last_layer_at_native_size_equals_todays_dense(make):
    model = make()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 1+L, D), the path `encode(..., 'dense')` took before
        before = tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
        (last,) = encode(model, x, "dense", layers=(-1,))
    assert torch.equal(last, before)


def test_intermediate_maps_are_normed_like_timm():
    model = _vit("token")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        raw = model.forward_intermediates(x, (1,), norm=False)[0]
        normed = model.forward_intermediates(x, (1,), norm=True)[0]
    expect = model.norm(raw.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(raw.shape)
    assert torch.allclose(normed, expect, atol=1e-6) and not torch.allclose(normed, raw)
    avg = _vit("avg")  # norm is Identity: maps are un-normalised whatever norm says
    a, b = avg.forward_intermediates(x, (1,), norm=True)[0], avg.forward_intermediates(x, (1,), norm=False)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("make", [_vit, _mae])
def test_encoder_tokens_keep_the_cls_token_of_each_chosen_block(make):
    model = make()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first, last = encoder_tokens(model, x, (0, -1), norm=True)
        (last_raw,) = encoder_tokens(model, x, 1, norm=False)  # an int: the last N blocks, as in timm
        (map_last,) = model.forward_intermediates(x, (-1,), norm=True) if hasattr(model, "forward_intermediates") \
            else encode(model, x, "dense", layers=(-1,))
    assert first.shape == last.shape == (2, 1 + 16, 32) and not torch.equal(first, last)
    assert torch.equal(last[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4), map_last)  # the maps drop only the cls
    assert torch.allclose(model.norm(last_raw), last, atol=1e-6)
    if isinstance(model, VisionTransformer):
        assert torch.allclose(last, model.forward_features(x), atol=1e-6)


def test_position_embedding_native_is_the_parameter_and_others_are_resampled_and_cached():
    model = _vit()
    assert pos_embed_for(model, (4, 4)) is model.pos_embed  # no resampling at the native grid
    with torch.no_grad():
        p = pos_embed_for(model, (3, 5))
        assert pos_embed_for(model, (3, 5)) is p  # cached per grid
        assert torch.equal(p, resample_pos_embed(model.pos_embed, (3, 5), (4, 4)))
        model.pos_embed.add_(1.0)  # in-place change: the cache must not serve the old table
        assert not torch.equal(pos_embed_for(model, (3, 5)), p)


def test_indices_count_from_the_end_and_out_of_range_is_refused():
    model = _vit()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a, b = encode(model, x, "dense", layers=(0, -3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="block index 3 out of range for a 3-block"):
        encode(model, x, "dense", layers=(3,))
    with pytest.raises(ValueError, match="layers needs pool='dense'"):
        encode(model, x, "avg", layers=(0,))


@pytest.mark.parametrize("make", [_vit, _mae])
def test_size_not_a_multiple_of_the_patch_is_one_clear_error(make):
    with pytest.raises(ValueError, match=r"input size 18x16 is not a multiple of the patch size 4"):
        encode(make(), torch.randn(1, 3, 18, 16), "dense")


def test_patch_embedding_is_unfold_plus_linear():
    """PatchEmbed's strided conv equals cutting p x p patches (unfold) and one matrix product with the same weights."""
    pe = _vit().patch_embed
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        conv = pe(x)  # (B, L, D)
        cols = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (B, L, C*p*p) in (c, i, j) order
        W = pe.proj.weight.reshape(pe.proj.weight.shape[0], -1)  # (D, C*p*p)
        lin = cols @ W.T + pe.proj.bias  # (B, L, D)
    assert torch.allclose(conv, lin, atol=1e-5)
