"""Vision Transformer building blocks and the classification ViT, with official parameter names.

Shapes: B batch, C channels, H, W image, p patch, h, w = H/p, W/p, L = h*w patches,
N = 1 + L tokens (cls first), D width. Names match the official `models_vit.py` / timm ViT
(`patch_embed.proj`, `blocks.{i}.attn.qkv`, `fc_norm`, `head`, ...) so checkpoints load strictly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from .pos_embed import resample_pos_embed, sincos_2d

LN_EPS = 1e-6  # the official models use LayerNorm(eps=1e-6)


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """7 -> (7, 7); (3, 4) -> (3, 4)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair (height, width), got {x}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def check_heads(dim: int, num_heads: int, what: str = "embed_dim") -> None:
    """Raise a ValueError unless dim is divisible by num_heads."""
    if num_heads <= 0 or dim % num_heads:
        raise ValueError(f"{what} {dim} must be divisible by the number of heads {num_heads}")


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens by a strided conv: (B, C, H, W) -> (B, L, D)."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        H, W = to_2tuple(img_size)
        if patch_size <= 0 or H % patch_size or W % patch_size:
            raise ValueError(
                f"image size {H}x{W} is not divisible by the patch size {patch_size}; "
                f"choose an image size that is a multiple of the patch size"
            )
        if in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        self.img_size = (H, W)
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.grid_size = (H // patch_size, W // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_for(self, H: int, W: int) -> tuple[int, int]:
        """The patch grid (h, w) of an H x W input; a ValueError naming both when a side is not a multiple of p."""
        p = self.patch_size[0]
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}; "
                             f"resize or crop the images to multiples of {p} (e.g. {H // p * p}x{W // p * p})")
        return H // p, W // p

    def forward(self, x: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, D). any_size: accept every H, W that are multiples of p (the caller then
        brings the position embedding to `grid_for(H, W)`); else only the model's own img_size."""
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        _, C, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(
                f"model expects {self.in_chans} input channels, got {C}; convert the images "
                f"(e.g. --data.channels {self.in_chans}) or build the model with in_chans={C}"
            )
        if any_size:
            self.grid_for(H, W)
        elif (H, W) != self.img_size:
            raise ValueError(
                f"input size {H}x{W} differs from the model's {self.img_size[0]}x{self.img_size[1]}; "
                f"resize the images or build the model with img_size=({H}, {W})"
            )
        x = self.proj(x)  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)


# On CPU in bf16, PyTorch's flash-attention kernel has a slow backward; for short sequences explicit
# matmuls + an fp32 softmax are 2-4x faster per attention call (measured in BENCHMARKS.md). Above this
# many tokens the two are even and SDPA's lower memory wins.
MATH_ATTENTION_MAX_TOKENS = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for (B, heads, N, hd) inputs; SDPA except short bf16 sequences on CPU."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= MATH_ATTENTION_MAX_TOKENS:
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = attn.float().softmax(dim=-1).to(v.dtype)
        return attn @ v  # (B, heads, N, hd)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, hd)
        x = attention(q, k, v)  # (B, heads, N, hd)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 norm_eps: float = LN_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    checkpointing = False  # activation checkpointing: keep only the input, recompute the rest in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # non-reentrant: works under FSDP2 and torch.compile; the RNG state (drop path) is replayed
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, M, D) to a context (B, N, D): q from the queries, k and v from the context
    (CrossMAE's decoder attention; no attention among the queries)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, M, D = x.shape
        N, h = context.shape[1], self.num_heads
        q = self.q(x).reshape(B, M, h, D // h).transpose(1, 2)  # (B, heads, M, hd)
        k, v = self.kv(context).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, N, hd)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, M, D))  # (B, M, D)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: x + attn(norm1(x), norm_context(context)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = LN_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_context = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.norm_context(context))
        return x + self.mlp(self.norm2(x))


def init_linear_and_norm(m: nn.Module) -> None:
    """The official MAE initialisation: xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_patch_embed(pe: PatchEmbed) -> None:
    """Xavier-uniform on the conv weight viewed as a (D, C*p*p) linear, as the official code does."""
    w = pe.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(pe.proj.bias)


# Encoder sizes of the paper / timm (width, depth, heads). Patch sizes 14/16 are for 224-pixel
# images; 2/4/8 are for small images (28-64 pixels) such as Fashion-MNIST or CIFAR.
ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
PATCH_SIZES = (2, 4, 8, 14, 16)
VARIANTS: dict[str, dict[str, int]] = {
    f"vit_{size}_patch{p}": dict(kw, patch_size=p) for size, kw in ENCODER_SIZES.items() for p in PATCH_SIZES
}
# The small-data default (Fashion-MNIST, 28x28): ViT-Ti width with half its depth, patch 4 -> 7x7 tokens.
VARIANTS["vit_tiny_d6_patch4"] = dict(ENCODER_SIZES["tiny"], depth=6, patch_size=4)


def variant_kwargs(name: str, table: dict[str, dict], kind: str = "ViT") -> dict:
    """Look a variant up in a table, or raise a ValueError that lists the valid names."""
    if name not in table:
        raise ValueError(f"unknown {kind} variant {name!r}; valid names: {', '.join(sorted(table))}")
    return dict(table[name])


def pos_embed_for(model: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The model's position embedding (1, 1+h*w, D) for a patch grid: the parameter itself at the native grid,
    else resampled bicubically (`resample_pos_embed`). Without autograd the resampled table is cached per grid
    (and invalidated when the parameter changes in place, e.g. by load_state_dict or an optimizer step)."""
    pos = model.pos_embed
    native = tuple(model.patch_embed.grid_size)
    if tuple(grid) == native:
        return pos
    if torch.is_grad_enabled() and pos.requires_grad:
        return resample_pos_embed(pos, grid, native, n_prefix=1)  # differentiable, not cached
    key = (tuple(grid), pos._version, pos.data_ptr(), pos.dtype, pos.device)
    cache: dict = model.__dict__.setdefault("_pos_embed_cache", {})
    if key not in cache:
        cache.clear()  # one parameter version at a time; a few grids of it
        cache[key] = resample_pos_embed(pos.detach(), grid, native, n_prefix=1)
    return cache[key]


def normalise_indices(indices: int | tuple[int, ...] | list[int], depth: int) -> list[int]:
    """Block indices (negative count from the end) -> non-negative ones in the given order; a ValueError when one
    is out of range. An int n means the last n blocks, as in timm."""
    if isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"asked for the last {indices} blocks of a {depth}-block encoder")
        return list(range(depth - indices, depth))
    out = []
    for i in indices:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise ValueError(f"block index {i} out of range for a {depth}-block encoder (use 0..{depth - 1} "
                             f"or -{depth}..-1)")
        out.append(j)
    if not out:
        raise ValueError("layers must name at least one block")
    return out


def encoder_tokens(model: nn.Module, x: torch.Tensor, indices: int | tuple[int, ...] | list[int] = (-1,),
                   norm: bool = True) -> list[torch.Tensor]:
    """Token sequences (B, 1+L, D), cls token first, of the chosen encoder blocks for images (B, C, H, W) of any
    size that is a multiple of the patch: `encoder_intermediates` with the prefix token kept (timm's
    `return_prefix_tokens`). norm=True applies the model's final `norm`. Returned in the order of `indices`."""
    wanted = normalise_indices(indices if isinstance(indices, int) else tuple(indices), len(model.blocks))
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    pos = pos_embed_for(model, model.patch_embed.grid_for(x.shape[-2], x.shape[-1]))  # (1, 1+L, D)
    t = model.patch_embed(x, any_size=True) + pos[:, 1:]  # (B, L, D)
    cls = (model.cls_token + pos[:, :1]).expand(t.shape[0], -1, -1)  # (B, 1, D)
    t = torch.cat([cls, t], dim=1)  # (B, 1+L, D)
    found: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks[: max(wanted) + 1]):
        t = blk(t)
        if i in wanted:
            found[i] = model.norm(t) if norm else t
    return [found[i] for i in wanted]


def encoder_intermediates(model: nn.Module, x: torch.Tensor, indices: int | tuple[int, ...] | list[int] = (-1,),
                          norm: bool = True) -> list[torch.Tensor]:
    """Maps (B, D, h, w) of the chosen encoder blocks for images (B, C, H, W) of any size that is a multiple of
    the patch (timm's `forward_intermediates(..., output_fmt='NCHW', intermediates_only=True)`).

    Shared by VisionTransformer and MaskedAutoencoderViT (same encoder names). norm=True applies the model's
    final `norm` to every returned map, as timm does; an avg-pool ViT's `norm` is Identity (its fc_norm acts
    after pooling), so its maps are un-normalised. Returned in the order of `indices`.
    """
    tokens = encoder_tokens(model, x, indices, norm)
    h, w = model.patch_embed.grid_for(x.shape[-2], x.shape[-1])
    B, D = x.shape[0], tokens[0].shape[-1]
    return [t[:, 1:].transpose(1, 2).reshape(B, D, h, w) for t in tokens]  # each (B, D, h, w)


class VisionTransformer(nn.Module):
    """Classification ViT: cls token + learnable position embedding, pooled by 'avg' or 'token'.

    global_pool='avg' (the MAE fine-tuning default) averages the patch tokens and applies `fc_norm`;
    'token' applies `norm` and takes the cls token. timm-style: `forward_features` returns tokens,
    `forward_head` pools. Position embeddings start as fixed sin-cos.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        global_pool: Literal["avg", "token"] = "avg",
        drop_path_rate: float = 0.0,
        norm_eps: float = LN_EPS,
    ):
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        check_heads(embed_dim, num_heads)
        if depth <= 0:
            raise ValueError(f"depth must be positive, got {depth}")
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + L, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # grows with depth (meta-safe)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dpr[i], norm_eps) for i in range(depth))
        # timm's layout: avg pooling normalises after pooling (fc_norm), token pooling before it (norm)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if global_pool == "token" else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        gh, gw = self.patch_embed.grid_size
        if self.embed_dim % 4 == 0:
            self.pos_embed.data.copy_(sincos_2d(gh, gw, self.embed_dim, cls_token=True).unsqueeze(0))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_patch_embed(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)  # the MAE fine-tuning head init

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> all tokens (B, 1+L, D) after the blocks and `norm` (Identity for avg pooling,
        whose `fc_norm` applies after pooling, as in timm)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, L, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1+L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | tuple[int, ...] | list[int] = (-1,),
                              norm: bool = True) -> list[torch.Tensor]:
        """Maps (B, D, h, w) of the chosen blocks for any input size that is a multiple of the patch
        (`encoder_intermediates`; with avg pooling `norm` is Identity, so norm=True leaves the maps as they are)."""
        return encoder_intermediates(self, x, indices, norm)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 1+L, D) -> pooled features (B, D) by global_pool (+ fc_norm for avg), then logits (B, K)
        unless pre_logits. The one place this model pools."""
        if self.global_pool == "avg":
            x = self.fc_norm(tokens[:, 1:].mean(dim=1))  # (B, D)
        else:
            x = tokens[:, 0]  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def build_vit(name: str, **overrides) -> VisionTransformer:
    """Classification ViT from the VARIANTS table, e.g. build_vit('vit_base_patch16', num_classes=10)."""
    kwargs = variant_kwargs(name, VARIANTS)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)
