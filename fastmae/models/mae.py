"""The masked autoencoder: ViT encoder on visible patches, light decoder with mask tokens.

Shapes: B batch, C channels, H, W image, p patch, h, w = H/p, W/p, L = h*w patches,
K = int(L * (1 - mask_ratio)) visible patches, M decoded patches, D encoder width, Dd decoder width.
Parameter names, initialisation and the order of random draws follow the official
`models_mae.py`, so official checkpoints load with strict=True and a seeded run reproduces its mask.

Two decoders. 'self' (the paper's): mask tokens join the visible tokens, all L + 1 attend to each other, every masked
patch is predicted. 'cross' (CrossMAE, Fu et al., 2024): only M of the masked patches are decoded
(`kept_mask_ratio` x L of them, the first M of the masked ones in the mask's own random order; 0: all), each query a
mask token plus its position, and each decoder block's queries attend to the encoder's tokens, not to each other:
decoding costs M x (1 + K) attention instead of (1 + L)^2. The encoder is the same in both (names and shapes).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .masking import check_mask_ratio, random_masking
from .patches import patchify, unpatchify
from .pos_embed import sincos_2d
from .vit import (
    ENCODER_SIZES,
    LN_EPS,
    PATCH_SIZES,
    VARIANTS,
    Block,
    CrossBlock,
    PatchEmbed,
    check_heads,
    encoder_intermediates,
    init_linear_and_norm,
    init_patch_embed,
    variant_kwargs,
)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT backbone; `forward(imgs, mask_ratio, noise) -> (loss, pred, mask)`."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        norm_eps: float = LN_EPS,
        decoder: str = "self",
        kept_mask_ratio: float = 0.0,
    ):
        super().__init__()
        if decoder not in ("self", "cross"):
            raise ValueError(f"decoder must be 'self' (MAE's) or 'cross' (CrossMAE's), not {decoder!r}")
        if not 0 <= kept_mask_ratio < 1 or (kept_mask_ratio and decoder == "self"):
            raise ValueError(f"kept_mask_ratio {kept_mask_ratio}: the share of patches a cross decoder decodes, in "
                             f"[0, 1) (0 = every masked patch); the self decoder decodes every masked patch (0)")
        check_heads(embed_dim, num_heads)
        check_heads(decoder_embed_dim, decoder_num_heads, "decoder_embed_dim")
        for name, dim in (("embed_dim", embed_dim), ("decoder_embed_dim", decoder_embed_dim)):
            if dim % 4:
                raise ValueError(f"{name} {dim} must be divisible by 4 for the 2D sin-cos position embedding")
        if depth <= 0 or decoder_depth < 0:
            raise ValueError(f"depth must be positive and decoder_depth non-negative, got {depth}, {decoder_depth}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + L, embed_dim), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, norm_eps=norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + L, decoder_embed_dim), requires_grad=False)
        self.decoder, self.kept_mask_ratio = decoder, kept_mask_ratio
        block = CrossBlock if decoder == "cross" else Block
        self.decoder_blocks = nn.ModuleList(
            block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_eps=norm_eps) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: sin-cos pos embeds, xavier patch/linears, normal(0.02) cls and mask tokens."""
        gh, gw = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(gh, gw, self.pos_embed.shape[-1], cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_2d(gh, gw, self.decoder_pos_embed.shape[-1], cls_token=True).unsqueeze(0)
        )
        init_patch_embed(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C)."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        h, w = self.grid_size
        return unpatchify(x, self.patch_size, h, w, self.in_chans)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions (B, N, D) -> cls prepended, blocks, `norm`: (B, 1+N, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only: latent (B, 1+K, D), mask (B, L), ids_restore (B, L)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (B, L, D)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (B, K, D)
        return self._encode(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encode every patch without masking, in grid order: (B, 1+L, D) after `norm` (for features, as a
        VisionTransformer's forward_features)."""
        return self._encode(self.patch_embed(imgs) + self.pos_embed[:, 1:])

    def forward_intermediates(self, imgs: torch.Tensor, indices: int | tuple[int, ...] | list[int] = (-1,),
                              norm: bool = True) -> list[torch.Tensor]:
        """Maps (B, D, h, w) of the chosen encoder blocks, unmasked, for any input size that is a multiple of the
        patch; norm=True applies the encoder's final `norm` to each (`vit.encoder_intermediates`)."""
        return encoder_intermediates(self, imgs, indices, norm)

    def decoded_ids(self, ids_restore: torch.Tensor, K: int, kept_mask_ratio: float | None = None) -> torch.Tensor:
        """The patches a cross decoder predicts (B, M), of L with K visible: the first M masked patches of the mask's
        random order (M = int(L * kept_mask_ratio), every masked one for 0), so the choice comes from the mask's own
        draw (no further randomness: a seeded run decodes the same patches)."""
        L = ids_restore.shape[1]
        ratio = self.kept_mask_ratio if kept_mask_ratio is None else kept_mask_ratio
        M = min(int(L * ratio), L - K) if ratio else L - K
        ids_shuffle = torch.argsort(ids_restore, dim=1)  # (B, L): the kept first, then the masked in random order
        return ids_shuffle[:, K : K + M]

    def forward_cross_decoder(self, latent: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Latent (B, 1+K, D) and the patches to decode (B, M) -> their pixel predictions (B, M, p*p*C)."""
        context = self.decoder_embed(latent)  # (B, 1+K, Dd)
        B, M = ids.shape
        Dd = context.shape[-1]
        pos = self.decoder_pos_embed[:, 1:].expand(B, -1, -1)  # (B, L, Dd)
        x = self.mask_token.to(context.dtype) + torch.gather(pos, 1, ids.unsqueeze(-1).expand(-1, -1, Dd))  # (B, M, Dd)
        for blk in self.decoder_blocks:
            x = blk(x, context)
        return self.decoder_pred(self.decoder_norm(x))  # (B, M, p*p*C)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent (B, 1+K, D) -> per-patch pixel predictions (B, L, p*p*C). A cross decoder predicts every masked
        patch here (zeros at the visible ones)."""
        if self.decoder == "cross":
            ids = self.decoded_ids(ids_restore, latent.shape[1] - 1, kept_mask_ratio=0.0)
            pred = self.forward_cross_decoder(latent, ids)  # (B, M, p*p*C)
            out = pred.new_zeros(ids_restore.shape[0], ids_restore.shape[1], pred.shape[-1])
            return out.scatter(1, ids.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), pred)
        x = self.decoder_embed(latent)  # (B, 1+K, Dd)
        B, K1, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L + 1 - K1, Dd)  # (B, L-K, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # (B, L, Dd) unshuffled
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1+L, p*p*C)
        return x[:, 1:]  # (B, L, p*p*C): drop the cls token

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The regression target (B, L, p*p*C): pixels, or per-patch normalised pixels with norm_pix_loss."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only (mask == 1)."""
        loss = ((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1)  # (B, L)
        # With mask_ratio 0 nothing is removed: the loss is 0 rather than 0/0.
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
        kept_mask_ratio: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, C, H, W) -> loss (scalar), pred (B, L, p*p*C), mask (B, L) with 1 = removed.

        A cross decoder decodes and scores `kept_mask_ratio` x L of the masked patches (None: the model's; 0: all);
        `pred` holds those, zeros elsewhere, and the loss is their MSE."""
        check_mask_ratio(mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if self.decoder == "self":
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask
        ratio = self.kept_mask_ratio if kept_mask_ratio is None else kept_mask_ratio
        if ratio > mask_ratio:
            raise ValueError(f"kept_mask_ratio {ratio} is above the mask ratio {mask_ratio}: a cross decoder decodes "
                             f"some of the masked patches, at most all of them")
        ids = self.decoded_ids(ids_restore, latent.shape[1] - 1, ratio)  # (B, M)
        part = self.forward_cross_decoder(latent, ids)  # (B, M, p*p*C)
        index = ids.unsqueeze(-1).expand(-1, -1, part.shape[-1])
        target = torch.gather(self.target(imgs), 1, index)  # (B, M, p*p*C)
        loss = ((part.float() - target.float()) ** 2).mean()  # the MSE of the decoded patches
        pred = part.new_zeros(ids.shape[0], ids_restore.shape[1], part.shape[-1]).scatter(1, index, part)
        return loss, pred, mask

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "decoder_pos_embed", "cls_token", "mask_token"}


# Decoders: the paper's 512 wide x 8 deep for 224-pixel models; a small one for small images,
# where a 512-wide decoder would cost more than the encoder.
DECODER_PAPER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
DECODER_SMALL = dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4)
MAE_VARIANTS: dict[str, dict[str, int]] = {
    f"mae_vit_{size}_patch{p}": dict(kw, patch_size=p, **(DECODER_PAPER if p >= 14 else DECODER_SMALL))
    for size, kw in ENCODER_SIZES.items()
    for p in PATCH_SIZES
}
# `fastmae pretrain`'s default: 6 blocks of ViT-Ti width and a 2-block decoder, sized so that 20 epochs of
# Fashion-MNIST fit in about 20 minutes on 2 CPU cores (BENCHMARKS.md).
MAE_VARIANTS["mae_vit_tiny_d6_patch4"] = dict(VARIANTS["vit_tiny_d6_patch4"], decoder_embed_dim=128, decoder_depth=2,
                                              decoder_num_heads=4)


def build_mae(name: str, **overrides) -> MaskedAutoencoderViT:
    """MAE from the MAE_VARIANTS table, e.g. build_mae('mae_vit_base_patch16', norm_pix_loss=True)."""
    kwargs = variant_kwargs(name, MAE_VARIANTS, kind="MAE")
    kwargs.update(overrides)
    return MaskedAutoencoderViT(**kwargs)
