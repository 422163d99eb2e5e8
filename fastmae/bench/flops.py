"""Analytic matmul FLOPs of an MAE pretraining step and a ViT fine-tuning step (2 per multiply-add of every
linear, conv and attention matmul; training = 3 x forward), checked against FlopCounterMode in the tests.

Shapes: B batch, L patches, K kept patches, D encoder width, Dd decoder width.
"""

from __future__ import annotations

MASK_RATIO = 0.75  # the paper's


def mae_forward_flops(
    img_size: int | tuple[int, int],
    patch_size: int,
    embed_dim: int,
    depth: int,
    decoder_embed_dim: int,
    decoder_depth: int,
    in_chans: int = 3,
    mlp_ratio: float = 4.0,
    mask_ratio: float = MASK_RATIO,
    batch: int = 1,
    decoder: str = "self",
    kept_mask_ratio: float = 0.0,
) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one MAE forward pass, by part, plus their 'total'.

    Counted: the patch-embedding conv on all L patches; per block on N tokens of width d the qkv,
    proj, fc1 and fc2 linears (2*N*d*(4d + 2*hidden)) and attention's QK^T and AV (2 * 2*N*N*d);
    encoder blocks on N = 1+K, decoder_embed on 1+K, decoder blocks and decoder_pred on N = 1+L. A cross decoder
    (`cross_block_flops`): M queries (kept_mask_ratio x L, or the L - K masked) against the 1+K encoder tokens,
    decoder_pred on M.
    Not counted: norms, activations, softmax, masking, the loss, the optimizer.
    """
    H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if H % patch_size or W % patch_size:
        raise ValueError(f"img_size {H}x{W} is not divisible by patch_size {patch_size}")
    L = (H // patch_size) * (W // patch_size)
    K = int(L * (1 - mask_ratio))  # = fastmae.models.masking.num_kept, the official count
    P = patch_size**2 * in_chans  # pixels per patch

    M = (min(int(L * kept_mask_ratio), L - K) if kept_mask_ratio else L - K) if decoder == "cross" else 1 + L
    parts = {
        "patch_embed": 2 * L * P * embed_dim,
        "encoder": depth * block_flops(1 + K, embed_dim, mlp_ratio),
        "decoder_embed": 2 * (1 + K) * embed_dim * decoder_embed_dim,
        "decoder": decoder_depth * (cross_block_flops(M, 1 + K, decoder_embed_dim, mlp_ratio) if decoder == "cross"
                                    else block_flops(1 + L, decoder_embed_dim, mlp_ratio)),
        "decoder_pred": 2 * M * decoder_embed_dim * P,
    }
    return _per_batch(parts, batch)


def cross_block_flops(m: int, n: int, d: int, mlp_ratio: float = 4.0) -> int:
    """One cross-attention block, m queries on n context tokens of width d: q, proj, fc1, fc2 on the m queries, kv on
    the n context tokens, and QK^T, AV (m x n)."""
    hidden = int(d * mlp_ratio)
    return 2 * m * d * (2 * d + 2 * hidden) + 2 * n * d * 2 * d + 2 * 2 * m * n * d


def block_flops(n: int, d: int, mlp_ratio: float = 4.0) -> int:
    """One transformer block on n tokens of width d: qkv, proj, fc1, fc2 linears and QK^T, AV."""
    hidden = int(d * mlp_ratio)
    return 2 * n * d * (4 * d + 2 * hidden) + 2 * 2 * n * n * d


def _per_batch(parts: dict[str, int], batch: int) -> dict[str, int]:
    parts = {k: v * batch for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def vit_forward_flops(
    img_size: int | tuple[int, int], patch_size: int, embed_dim: int, depth: int, in_chans: int = 3, mlp_ratio: float = 4.0,
    num_classes: int = 1000, batch: int = 1,
) -> dict[str, int]:
    """Matmul FLOPs of one classification-ViT forward (fine-tuning): every block on all N = 1+L tokens."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if H % patch_size or W % patch_size:
        raise ValueError(f"img_size {H}x{W} is not divisible by patch_size {patch_size}")
    L = (H // patch_size) * (W // patch_size)
    parts = {
        "patch_embed": 2 * L * patch_size**2 * in_chans * embed_dim,
        "encoder": depth * block_flops(1 + L, embed_dim, mlp_ratio),
        "head": 2 * embed_dim * num_classes,
    }
    return _per_batch(parts, batch)


def mae_train_flops(**kwargs) -> int:
    """Model FLOPs of one training step: 3 x forward (backward = grads of inputs and of weights)."""
    return 3 * mae_forward_flops(**kwargs)["total"]
