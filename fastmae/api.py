"""Small Python API over models: load any supported checkpoint, features for downstream use.

`load` turns a path (fastmae training checkpoint or run folder, fastmae safetensors export, official
MAE .pth, Hugging Face folder/file, timm state dict) or a variant name into a ready model in eval mode:
a `MaskedAutoencoderViT` when the weights hold an MAE decoder, else a `VisionTransformer`. Loading is
always strict; a task that needs the decoder checks for it with `require_decoder`.

Shapes: B batch, C channels, H, W image, L patches, h, w patch grid, D width.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from .data import IMAGENET_MEAN, IMAGENET_STD
from .mae import MAE_VARIANTS, MaskedAutoencoderViT, build_mae
from .vit import VARIANTS, VisionTransformer, build_vit

Pool = Literal["avg", "token", "dense"]


# The decoder tensors every MAE has besides its blocks (12 tensors per decoder block, 'decoder_blocks.{i}.*').
DECODER_KEYS = ("mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")


# ---------------------------------------------------------------------------------------------------
# Loading.

def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation assumed when a checkpoint does not record one: ImageNet's for RGB, 0.5 otherwise."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def _source_file(p: Path) -> Path:
    """The weights file/folder a path names: a run folder's newest checkpoint, a Hugging Face folder,
    a file, or `X` for a fastmae export X.safetensors + X.json."""
    from .checkpoint import find_latest
    from .convert import HF_WEIGHT_FILES

    if p.is_dir():
        latest = find_latest(p)
        if latest is not None:
            return latest
        if (p / "config.json").exists() and any((p / f).exists() for f in HF_WEIGHT_FILES):
            return p
        raise FileNotFoundError(
            f"{p} is a folder without training checkpoints (checkpoint-*.pt) or Hugging Face weights "
            f"(config.json + {' / '.join(HF_WEIGHT_FILES)}); pass a run folder, a checkpoint file or a model folder"
        )
    if p.exists():
        return p
    export = p.with_name(p.name + ".safetensors")
    if export.exists():
        return export
    names = ", ".join(sorted(MAE_VARIANTS)) + "; " + ", ".join(sorted(VARIANTS))
    raise FileNotFoundError(f"{p} does not exist, and it is not a variant name (MAE and ViT variants: {names})")


def _hf_stats(folder: Path) -> tuple[list[float], list[float]] | None:
    """image_mean/image_std of a Hugging Face folder's preprocessor_config.json, if it has one."""
    f = folder / "preprocessor_config.json"
    if not f.exists():
        return None
    try:
        pre = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    if isinstance(pre.get("image_mean"), list) and isinstance(pre.get("image_std"), list):
        return pre["image_mean"], pre["image_std"]
    return None


def _attach_stats(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """Set model.data_mean / model.data_std (tuples of floats; defaults when unknown or the wrong length)."""
    C = model.patch_embed.in_chans
    known = mean is not None and std is not None and len(mean) == C and len(std) == C
    if not known:
        mean, std = default_stats(C)
    model.data_mean = tuple(float(m) for m in mean)
    model.data_std = tuple(float(s) for s in std)
    model.data_stats_known = known  # False: the checkpoint did not say; the defaults are a guess
    return model


def load(
    path_or_name: str | Path,
    *,
    num_heads: int = 0,
    decoder_num_heads: int = 0,
    norm_pix_loss: bool | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """A ready model (eval mode) from a checkpoint or a variant name.

    path_or_name:
      - a fastmae run folder (its newest checkpoint-*.pt) or training checkpoint (its .json gives the kwargs);
      - a fastmae export X.safetensors (+ X.json), or X without the extension (`fastmae convert --to fastmae`);
      - an official MAE .pth ({'model': state_dict}), a timm state dict (.pth/.safetensors);
      - a Hugging Face folder (config.json + weights) or weights file (ViTMAEForPreTraining, ViTMAEModel,
        ViTForImageClassification);
      - a variant name from MAE_VARIANTS or VARIANTS ('mae_vit_base_patch16', 'vit_tiny_patch4'): a freshly
        initialised model.

    Returns a `MaskedAutoencoderViT` for a full MAE (encoder + decoder), else a `VisionTransformer`:
    a classifier as it was fine-tuned, or, for an encoder-only checkpoint (official mae_pretrain_vit_*.pth,
    HF ViTMAEModel), a `VisionTransformer(num_classes=0, global_pool='token')` whose `norm` is the MAE
    encoder's final norm: `encode(model, x, pool)` then gives the MAE's own features. Weights load strictly;
    a checkpoint that does not fit raises a ValueError naming keys and shapes.

    num_heads / decoder_num_heads: attention heads when the checkpoint does not record them (0 = metadata or
    config, else the standard widths); norm_pix_loss: override (official .pth files do not record it).
    The model gets `data_mean` / `data_std`: the normalisation recorded with the checkpoint (fastmae metadata,
    HF preprocessor_config.json), else ImageNet's for 3 channels and 0.5 otherwise (`data_stats_known` False).
    """
    from .convert import load_with_config, to_fastmae

    p = Path(path_or_name).expanduser()
    name = str(path_or_name)
    if not p.exists() and not p.with_name(p.name + ".safetensors").exists() and name in MAE_VARIANTS:
        model: nn.Module = build_mae(name, **({} if norm_pix_loss is None else {"norm_pix_loss": norm_pix_loss}))
        return _attach_stats(model.to(map_location).eval(), None, None)
    if not p.exists() and not p.with_name(p.name + ".safetensors").exists() and name in VARIANTS:
        return _attach_stats(build_vit(name).to(map_location).eval(), None, None)

    src = _source_file(p)
    sd, config = load_with_config(src)
    kind, sd, kw, extra = to_fastmae(sd, config, num_heads, decoder_num_heads)
    if kind == "mae":
        if norm_pix_loss is not None:
            kw["norm_pix_loss"] = norm_pix_loss
        model = MaskedAutoencoderViT(**kw)
    else:
        model = VisionTransformer(**kw)
    model.load_state_dict(sd, strict=True)  # to_fastmae checked names and shapes with clear errors
    stats = (extra.get("mean"), extra.get("std"))
    if stats[0] is None and src.is_dir():
        stats = _hf_stats(src) or stats
    model = _attach_stats(model.to(map_location).eval(), *stats)
    model.source = str(src)
    return model


def _suggest_full(path: str) -> str:
    """Which file has the decoder, named after the encoder-only file when it is an official one."""
    m = re.search(r"mae_pretrain_vit_(base|large|huge)", Path(path).name)
    size = m.group(1) if m else "<size>"
    return (f"the official mae_visualize_vit_{size}.pth or mae_pretrain_vit_{size}_full.pth, "
            f"or a fastmae pretraining checkpoint (a `fastmae pretrain` run folder or its checkpoint-*.pt)")


def require_decoder(model_or_sd: nn.Module | Mapping[str, torch.Tensor], path: str | Path = ""):
    """Return the MAE (or full MAE state dict) unchanged; raise a ValueError when it has no decoder.

    The message names missing decoder keys (a few, and how many) and which files have them. fastmae never
    loads non-strictly: the official demo's failure mode (encoder-only weights loaded with strict=False
    reconstruct noise from a random decoder) cannot happen.
    """
    if isinstance(model_or_sd, MaskedAutoencoderViT):
        return model_or_sd
    if isinstance(model_or_sd, nn.Module):
        keys = set(model_or_sd.state_dict())
        what = ("a classifier" if "head.weight" in keys else "an encoder without decoder")
        what += f" ({type(model_or_sd).__name__}, {len(keys)} tensors)"
    else:
        keys = set(model_or_sd)
        what = f"a state dict of {len(keys)} tensors"
    missing = [k for k in DECODER_KEYS if k not in keys]
    has_blocks = any(k.startswith("decoder_blocks.") for k in keys)
    if isinstance(model_or_sd, Mapping) and not missing and has_blocks:
        return model_or_sd
    shown = ", ".join(repr(k) for k in missing[:4]) + (" ..." if len(missing) > 4 else "")
    count = f"{len(missing)} tensors" + ("" if has_blocks else " plus 12 per decoder block 'decoder_blocks.{i}.*'")
    where = f"{path}" if path else "the checkpoint"
    raise ValueError(
        f"{where} holds {what}: it has no MAE decoder, which reconstruction needs. Missing decoder keys: "
        f"{shown} ({count}). Encoder-only checkpoints (official mae_pretrain_vit_*.pth, Hugging Face ViTMAEModel, "
        f"fastmae 'encoder' exports) cannot reconstruct images; use {_suggest_full(str(path))}."
    )


# ---------------------------------------------------------------------------------------------------
# Features.

def encoder_tokens(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """All tokens (B, 1+L, D) after the encoder's final norm: an MAE encoder (unmasked, after `norm`), a
    cls-token ViT (after `norm`: an MAE encoder loaded as a ViT gives the MAE's tokens), or an avg-pool ViT
    (after its blocks; its `fc_norm` applies after pooling)."""
    if isinstance(model, MaskedAutoencoderViT):
        return model.forward_tokens(imgs)
    if isinstance(model, VisionTransformer):
        tokens = model.forward_tokens(imgs)  # (B, 1+L, D)
        return model.norm(tokens) if model.global_pool == "token" else tokens
    raise TypeError(f"expected a MaskedAutoencoderViT or VisionTransformer, got {type(model).__name__}")


def encode(model: nn.Module, imgs: torch.Tensor, pool: Pool = "avg") -> torch.Tensor:
    """Images -> features: 'avg' mean of patch tokens (B, D), 'token' the cls token (B, D), 'dense' (B, D, h, w).

    For a classification ViT, 'avg'/'token' matching its global_pool return exactly what its head sees.
    An MAE and its encoder loaded as a cls-token ViT give the same features for every pool.
    """
    if pool not in ("avg", "token", "dense"):
        raise ValueError(f"pool must be 'avg', 'token' or 'dense', got {pool!r}")
    if isinstance(model, VisionTransformer):
        if pool == "dense":
            return model.forward_dense(imgs)
        if pool == model.global_pool:
            return model.forward_features(imgs)
    tokens = encoder_tokens(model, imgs)  # (B, 1+L, D)
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)  # (B, D)
    if pool == "token":
        return tokens[:, 0]  # (B, D)
    h, w = model.patch_embed.grid_size
    return tokens[:, 1:].transpose(1, 2).reshape(imgs.shape[0], -1, h, w)  # (B, D, h, w)
