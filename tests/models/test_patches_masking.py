"""Properties of the pure tensor functions: patchify, random_masking, sin-cos embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmae.models.masking import num_kept, random_masking
from fastmae.models.patches import patchify, unpatchify
from fastmae.models.pos_embed import resample_pos_embed, sincos_2d


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3), C=st.integers(1, 5), p=st.integers(1, 6), h=st.integers(1, 5), w=st.integers(1, 5)
)
def test_unpatchify_inverts_patchify(B, C, p, h, w):
    x = torch.randn(B, C, h * p, w * p)
    patches = patchify(x, p)
    assert patches.shape == (B, h * w, p * p * C)
    assert torch.equal(unpatchify(patches, p, h, w, C), x)


def test_patch_pixel_order_is_p_q_c():
    # the official order: row in patch, column in patch, then channel
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    first = patchify(x, 2)[0, 0]
    expected = torch.stack([x[0, c, i, j] for i in range(2) for j in range(2) for c in range(2)])
    assert torch.equal(first, expected)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        patchify(torch.zeros(1, 3, 10, 12), 4)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), L=st.integers(1, 50), D=st.integers(1, 8), r=st.floats(0.0, 0.99))
def test_masking_properties(B, L, D, r):
    x = torch.randn(B, L, D)
    kept, mask, ids_restore = random_masking(x, r)
    K = int(L * (1 - r))
    assert kept.shape == (B, K, D)
    assert (mask.sum(1) == L - K).all()  # exactly int(L*(1-r)) kept per sample
    # ids_restore inverts the shuffle: sort order by noise, then restore gives identity
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(B, L))
    # the kept tokens are exactly the ones with mask 0, in shuffle order
    for b in range(B):
        visible = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(visible, dim=0).values, torch.sort(kept[b], dim=0).values)


def test_masking_with_noise_keeps_smallest_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    x = torch.arange(4.0).reshape(1, 4, 1)
    kept, mask, _ = random_masking(x, 0.5, noise=noise)
    assert kept.flatten().tolist() == [1.0, 3.0]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_masking_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.zeros(1, 4, 2), ratio)


def test_num_kept_matches_official_formula():
    for L in (49, 64, 196, 256):
        for r in (0.5, 0.75, 0.9):
            assert num_kept(L, r) == int(L * (1 - r))


def _official_sincos(dim, gh, gw):
    """The official numpy construction (util/pos_embed.py), generalised to h x w, as a reference."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)), axis=0)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


@pytest.mark.parametrize("gh,gw,dim", [(7, 7, 64), (3, 5, 32), (14, 14, 768)])
def test_sincos_matches_official_numpy(gh, gw, dim):
    ours = sincos_2d(gh, gw, dim, cls_token=True)
    ref = torch.from_numpy(_official_sincos(dim, gh, gw)).float()
    assert torch.equal(ours, ref)


def test_sincos_rejects_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 30)


def test_resample_pos_embed_keeps_prefix_and_identity():
    pe = sincos_2d(4, 4, 32, cls_token=True).unsqueeze(0)
    same = resample_pos_embed(pe, (4, 4))
    assert torch.equal(same, pe)
    big = resample_pos_embed(pe, (8, 6))
    assert big.shape == (1, 1 + 48, 32)
    assert torch.equal(big[:, :1], pe[:, :1])
    assert math.isfinite(big.abs().max().item())
