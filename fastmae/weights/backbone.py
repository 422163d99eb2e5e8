"""Turn a checkpoint (MAE, encoder or classifier; any supported format) or `random` into a classification ViT.

Shapes: D width, h, w patch grid. Encoder weights are copied strictly: the only keys a new classifier
may lack are its head (and `fc_norm` for average pooling, which the MAE encoder does not have).
Position embeddings are resampled (bicubic) when the target grid differs from the checkpoint's.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch.nn as nn

from ..config import EncoderConfig, MAEModelConfig, SourceConfig
from ..models.mae import MAE_VARIANTS
from ..models.pos_embed import resample_pos_embed
from ..models.vit import VARIANTS, VisionTransformer, variant_kwargs
from .read import Weights, read_weights

SourceT = TypeVar("SourceT", bound=SourceConfig)


def encoder_kwargs(model: nn.Module) -> dict:
    """Encoder constructor kwargs of an MAE or ViT instance."""
    blk = model.blocks[0]
    D = model.cls_token.shape[-1]
    return dict(img_size=tuple(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
                in_chans=model.patch_embed.in_chans, embed_dim=D, depth=len(model.blocks),
                num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / D)


def encoder_init(init: str, model_cfg: EncoderConfig) -> Weights:
    """The encoder to start from: `init`'s encoder weights (any checkpoint `read_weights` takes, or a run
    folder), or 'random' sizes from --model.name and its overrides (in_chans 0: decided by the data)."""
    if init == "random":
        kw = variant_kwargs(model_cfg.name, VARIANTS)
        kw.update({k: getattr(model_cfg, k) for k in ("embed_dim", "depth", "num_heads") if getattr(model_cfg, k)})
        kw["img_size"] = tuple(model_cfg.img_size) if model_cfg.img_size[0] else (28, 28)
        kw["in_chans"] = 0
        return Weights("encoder", None, kw, source="random")
    return read_weights(init).encoder()


def data_for(bb: Weights, data_cfg: SourceT) -> SourceT:
    """Feed the encoder its own channel count and (unless given) the normalisation it was pretrained with."""
    changes: dict = {}
    if data_cfg.channels == 0 and bb.model_kwargs.get("in_chans"):
        changes["channels"] = bb.model_kwargs["in_chans"]
    if not data_cfg.mean and bb.mean and bb.std:
        changes.update(mean=tuple(bb.mean), std=tuple(bb.std))
    return dataclasses.replace(data_cfg, **changes)


def build_classifier(bb: Weights, model_cfg: EncoderConfig, num_classes: int, in_chans: int, *, global_pool: str,
                     drop_path: float = 0.0) -> VisionTransformer:
    """A VisionTransformer with the backbone's encoder weights, a fresh head (std 2e-5), and the requested pooling
    ('token' keeps the encoder's final norm: what a frozen encoder is read through)."""
    kw = dict(bb.model_kwargs)
    if not kw.get("in_chans"):
        kw["in_chans"] = in_chans
    old_hw = tuple(kw["img_size"])
    if model_cfg.img_size[0]:
        kw["img_size"] = tuple(model_cfg.img_size)
    model = VisionTransformer(**kw, num_classes=num_classes, global_pool=global_pool,
                              drop_path_rate=drop_path)
    if bb.state_dict is None:
        return model
    sd = dict(bb.state_dict)
    p = kw["patch_size"]
    old_grid, new_grid = (old_hw[0] // p, old_hw[1] // p), model.grid_size
    if old_grid != new_grid:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], new_grid, old_grid, n_prefix=1)
    own = model.state_dict()
    # avg pooling has fc_norm instead of norm; a classifier checkpoint's head is replaced
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(("norm.", "fc_norm."))}
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    allowed_missing = {k for k in own if k.startswith(("head.", "fc_norm.", "norm."))}
    bad_missing = [k for k in missing if k not in allowed_missing]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if unexpected or bad_missing or shapes:
        raise ValueError(
            f"cannot initialise the classifier from {bb.source}: missing {bad_missing[:8]}, unexpected "
            f"{unexpected[:8]}, shape mismatches {shapes[:8]}"
        )
    model.load_state_dict(sd, strict=False)  # only head / fc_norm may be left at their fresh init (checked above)
    return model


OVERRIDABLE = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def mae_kwargs(cfg: MAEModelConfig, in_chans: int) -> dict:
    """Constructor kwargs: the variant's sizes, overridden by every non-zero field of the config."""
    kw = variant_kwargs(cfg.name, MAE_VARIANTS, kind="MAE")
    kw.update({k: getattr(cfg, k) for k in OVERRIDABLE if getattr(cfg, k)})
    kw.update(img_size=tuple(cfg.img_size), in_chans=cfg.in_chans or in_chans, norm_pix_loss=cfg.norm_pix_loss)
    return kw
