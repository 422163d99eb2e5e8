"""Frozen-feature choices for kNN / linear probes: 'tokens' (every patch token, flattened) and the 'auto' rule."""

from __future__ import annotations

import pytest
import torch

from fastmae import encode
from fastmae.models.encode import TOKENS_MAX_PATCHES, feature_pool
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.vit import VisionTransformer


def _mae(img: int, patch: int = 4) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(img_size=img, patch_size=patch, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                                decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2).eval()


def test_tokens_are_the_dense_map_flattened_in_patch_order():
    model = _mae(28)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        flat = encode(model, x, "tokens")
        dense = encode(model, x, "dense")  # (B, D, h, w), after the final norm
        avg = encode(model, x, "avg")
    assert flat.shape == (3, 49 * 16)
    torch.testing.assert_close(flat, dense.flatten(2).transpose(1, 2).flatten(1))  # token 0's D values first
    torch.testing.assert_close(flat.view(3, 49, 16).mean(1), avg)


@pytest.mark.parametrize(("img", "patch", "want"), [(28, 4, "tokens"), (32, 4, "tokens"), (36, 4, "avg"),
                                                    (224, 16, "avg")])
def test_auto_is_tokens_on_small_patch_grids_only(img, patch, want):
    model = _mae(img, patch)
    assert (model.patch_embed.num_patches <= TOKENS_MAX_PATCHES) == (want == "tokens")
    assert feature_pool("auto", model) == want
    for explicit in ("avg", "token", "tokens"):
        assert feature_pool(explicit, model) == explicit


def test_tokens_of_a_cls_token_vit_match_the_mae_encoder():
    mae = _mae(28)
    vit = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=0,
                            global_pool="token").eval()
    vit.load_state_dict({k: v for k, v in mae.state_dict().items() if k in vit.state_dict()}, strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(encode(vit, x, "tokens"), encode(mae, x, "tokens"))


def test_unknown_pool_is_named():
    with pytest.raises(ValueError, match="'tokens'"):
        encode(_mae(28), torch.randn(1, 1, 28, 28), "grid")
