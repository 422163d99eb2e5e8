"""Models built from a checkpoint (MAE, encoder or classifier; any supported format), `random`, or the flags.

`build_classifier` gives the classification ViT every encoder-reading command builds (an encoder with
num_classes=0); `load_into` is the one way weights enter a model of another size; `mae_kwargs` sizes an MAE from
--model.* flags.

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
from ..models.vit import LN_EPS, VARIANTS, VisionTransformer, variant_kwargs
from .read import Weights, read_weights

SourceT = TypeVar("SourceT", bound=SourceConfig)


def encoder_kwargs(model: nn.Module) -> dict:
    """Encoder constructor kwargs of an MAE or ViT instance (norm_eps only where it is not the default 1e-6)."""
    blk = model.blocks[0]
    D = model.cls_token.shape[-1]
    kw = dict(img_size=tuple(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
              in_chans=model.patch_embed.in_chans, embed_dim=D, depth=len(model.blocks),
              num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / D)
    return kw if blk.norm1.eps == LN_EPS else {**kw, "norm_eps": blk.norm1.eps}


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
    p = kw["patch_size"]
    load_into(model, bb.state_dict, (old_hw[0] // p, old_hw[1] // p), f"cannot initialise the classifier from {bb.source}",
              may_miss=("head.", "fc_norm.", "norm."), drop=("norm.", "fc_norm."))
    return model


def dense_encoder(bb: Weights, model_cfg: EncoderConfig, size: tuple[int, int], in_chans: int, finetune: bool,
                  drop_path: float = 0.0) -> VisionTransformer:
    """The encoder of a dense task (segment, detect) at the canvas size, its final norm kept; stochastic depth only
    when it is fine-tuned (a frozen encoder runs in eval mode)."""
    return build_classifier(bb, dataclasses.replace(model_cfg, img_size=tuple(size)), num_classes=0, in_chans=in_chans,
                            global_pool="token", drop_path=drop_path if finetune else 0.0)


def load_into(model: nn.Module, state_dict: dict, source_grid: tuple[int, int], what: str,
              may_miss: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> list[str]:
    """Copy `state_dict` into `model`, the one way weights enter a model built at another size: position tables
    (pos_embed, decoder_pos_embed: (1, 1+h*w, D)) resampled from `source_grid` to the model's grid; tensors under
    the `drop` prefixes the model lacks are left out; the model's tensors under `may_miss` may be absent (they keep
    their fresh init). Anything else missing, left over or of another shape is one ValueError that starts with
    `what`. Returns what the log should say (the resampling)."""
    sd = dict(state_dict)
    grid = tuple(model.patch_embed.grid_size)
    notes = []
    if tuple(source_grid) != grid:
        for key in ("pos_embed", "decoder_pos_embed"):
            if key in sd:
                sd[key] = resample_pos_embed(sd[key], grid, tuple(source_grid), n_prefix=1)  # (1, 1+h*w, D)
        notes.append(f"position embeddings resampled from {source_grid[0]}x{source_grid[1]} to {grid[0]}x{grid[1]}")
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(drop)} if drop else sd
    unexpected = sorted(set(sd) - set(own))
    missing = [k for k in own if k not in sd and not k.startswith(may_miss)] if may_miss else sorted(set(own) - set(sd))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if unexpected or missing or shapes:
        raise ValueError(f"{what}: missing {missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}")
    model.load_state_dict(sd, strict=not may_miss)  # only `may_miss` tensors may keep their fresh init (checked)
    return notes


OVERRIDABLE = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def mae_kwargs(cfg: MAEModelConfig, in_chans: int) -> dict:
    """Constructor kwargs: the variant's sizes, overridden by every non-zero field of the config."""
    kw = variant_kwargs(cfg.name, MAE_VARIANTS, kind="MAE")
    kw.update({k: getattr(cfg, k) for k in OVERRIDABLE if getattr(cfg, k)})
    kw.update(img_size=tuple(cfg.img_size), in_chans=cfg.in_chans or in_chans, norm_pix_loss=cfg.norm_pix_loss)
    check_decoder_flags(cfg)
    if cfg.decoder == "cross":  # (a self decoder's kwargs stay as they were: older readers take them)
        kw.update(decoder="cross", kept_mask_ratio=cfg.kept_mask_ratio)
    return kw


def check_decoder_flags(cfg: MAEModelConfig) -> None:
    """One line for a --model.kept_mask_ratio the decoder cannot take (before any work)."""
    if cfg.kept_mask_ratio and cfg.decoder != "cross":
        raise ValueError(f"--model.kept_mask_ratio {cfg.kept_mask_ratio} is for --model.decoder cross (MAE's own "
                         f"decoder decodes every masked patch)")
    if cfg.kept_mask_ratio > cfg.mask_ratio:
        raise ValueError(f"--model.kept_mask_ratio {cfg.kept_mask_ratio} is above --model.mask_ratio {cfg.mask_ratio}: "
                         f"the decoder decodes some of the masked patches, at most all of them")
