"""Small Python API over models: load any supported checkpoint, features for downstream use.

`load` turns a path (fastmae training checkpoint or run folder, fastmae safetensors export, official
MAE .pth, Hugging Face folder/file, timm state dict) or a variant name into a ready model in eval mode:
a `MaskedAutoencoderViT` when the weights hold an MAE decoder, else a `VisionTransformer`. Loading is
always strict; a task that needs the decoder checks for it with `require_decoder`.

Shapes: B batch, C channels, H, W image, L patches, h, w patch grid, D width.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from .models.mae import MAE_VARIANTS, MaskedAutoencoderViT
from .models.vit import VARIANTS, VisionTransformer, variant_kwargs
from .weights.read import Weights, default_stats, read_weights

Pool = Literal["avg", "token", "tokens", "dense"]

# Frozen-feature choice for kNN and linear probes (`--model.global_pool auto`): every patch token when the patch
# grid is this small, the mean of the patch tokens above. On 28x28 Fashion-MNIST (7x7 grid) the flattened tokens
# keep the layout mean pooling throws away (BENCHMARKS.md, "Which features"); on 224 px images (196 tokens) they
# would be 196 x D numbers per image, too many to keep for a whole dataset.
TOKENS_MAX_PATCHES = 64


def feature_pool(pool: str, model: nn.Module) -> str:
    """'auto' -> 'tokens' for a patch grid of at most TOKENS_MAX_PATCHES patches, else 'avg'; others unchanged."""
    if pool != "auto":
        return pool
    h, w = model.patch_embed.grid_size
    return "tokens" if h * w <= TOKENS_MAX_PATCHES else "avg"


# The decoder tensors every MAE has besides its blocks (12 tensors per decoder block, 'decoder_blocks.{i}.*').
DECODER_KEYS = ("mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")


# ---------------------------------------------------------------------------------------------------
# Loading.

def _attach_stats(model: nn.Module, w: Weights) -> nn.Module:
    """model.data_mean / data_std: the normalisation recorded with the checkpoint, else the defaults."""
    mean, std = (w.mean, w.std) if w.mean is not None else default_stats(model.patch_embed.in_chans)
    model.data_mean, model.data_std = tuple(mean), tuple(std)
    model.data_stats_known = w.stats_known  # False: the checkpoint did not say; the defaults are a guess
    model.source = w.source
    return model


def build_model(w: Weights) -> nn.Module:
    """The model a `Weights` describes (MAE for kind 'mae', else ViT), with its weights loaded strictly."""
    model: nn.Module = MaskedAutoencoderViT(**w.model_kwargs) if w.kind == "mae" else VisionTransformer(**w.model_kwargs)
    if w.state_dict is not None:
        model.load_state_dict(w.state_dict, strict=True)  # read_weights checked names and shapes with clear errors
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
      - a fastmae run folder (its newest checkpoint-*.pt) or training checkpoint (its .json gives the kwargs); a
        `fastmae segment` run gives its encoder (the segmentation head and pyramid are left out);
      - a fastmae export X.safetensors (+ X.json), or X without the extension (`fastmae convert --to fastmae`);
      - an official MAE .pth ({'model': state_dict}), a timm state dict (.pth/.safetensors);
      - a Hugging Face folder (config.json + weights) or weights file (ViTMAEForPreTraining, ViTMAEModel,
        ViTForImageClassification);
      - a released checkpoint's name ('mae_visualize_vit_large', 'mae_pretrain_vit_base_full', see
        `fastmae.weights.hub.RELEASES`): downloaded once into $FASTMAE_CACHE (default ~/.cache/fastmae); official
        *_full.pth decoders predict normalised pixels (norm_pix_loss=True), the visualize ones raw pixels;
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
    p = Path(path_or_name).expanduser()
    name = str(path_or_name)
    is_file = p.exists() or p.with_name(p.name + ".safetensors").exists()
    if not is_file and name in MAE_VARIANTS:
        w = Weights("mae", None, variant_kwargs(name, MAE_VARIANTS, kind="MAE"), source=name)
    elif not is_file and name in VARIANTS:
        w = Weights("vit", None, variant_kwargs(name, VARIANTS), source=name)
    else:
        w = read_weights(p, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                         variant_names=sorted(MAE_VARIANTS) + sorted(VARIANTS))
    if w.kind == "mae" and norm_pix_loss is not None:
        w.model_kwargs["norm_pix_loss"] = norm_pix_loss
    return _attach_stats(build_model(w).to(map_location).eval(), w)


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

def encode(model: nn.Module, imgs: torch.Tensor, pool: Pool = "avg",
           layers: Sequence[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Images -> features: 'avg' mean of patch tokens (B, D), 'token' the cls token (B, D), 'tokens' every patch
    token flattened in patch order (B, L*D), 'dense' (B, D, h, w).

    Tokens come from the model's `forward_features` (after its final `norm`). For a classification ViT, the
    pool matching its global_pool returns exactly what its head sees (`forward_head(pre_logits=True)`).
    An MAE and its encoder loaded as a cls-token ViT give the same features for every pool.

    'dense' takes any input whose sides are multiples of the patch size (position embeddings resampled and
    cached per grid). layers (dense only): block indices, negative from the end; returns one (B, D, h, w) map
    per index, each after the final `norm` as in timm's `forward_intermediates` (an avg-pool ViT's `norm` is
    Identity: its maps are un-normalised). layers=None returns the last block's map alone.
    """
    if pool not in ("avg", "token", "tokens", "dense"):
        raise ValueError(f"pool must be 'avg', 'token', 'tokens' or 'dense', got {pool!r}")
    if not isinstance(model, (MaskedAutoencoderViT, VisionTransformer)):
        raise TypeError(f"expected a MaskedAutoencoderViT or VisionTransformer, got {type(model).__name__}")
    if pool == "dense":
        maps = model.forward_intermediates(imgs, (-1,) if layers is None else tuple(layers), norm=True)
        return maps[0] if layers is None else maps  # (B, D, h, w) or a list of them
    if layers is not None:
        raise ValueError(f"layers needs pool='dense' (maps per block), got pool={pool!r}")
    tokens = model.forward_features(imgs)  # (B, 1+L, D)
    if isinstance(model, VisionTransformer) and pool == model.global_pool:
        return model.forward_head(tokens, pre_logits=True)  # (B, D)
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)  # (B, D)
    if pool == "tokens":
        return tokens[:, 1:].flatten(1)  # (B, L*D)
    return tokens[:, 0]  # (B, D)
