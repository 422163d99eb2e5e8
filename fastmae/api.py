"""Small Python API over models: load any supported checkpoint; `encode` (models/encode.py) gives its features.

`load` turns a path (fastmae training checkpoint or run folder, fastmae safetensors export, official
MAE .pth, Hugging Face folder/file, timm state dict) or a variant name into a ready model in eval mode:
a `MaskedAutoencoderViT` when the weights hold an MAE decoder, else a `VisionTransformer`. Loading is
always strict; a task that needs the decoder checks for it with `require_decoder`.

Shapes: B batch, C channels, H, W image, L patches, h, w patch grid, D width.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from .models.encode import Pool, encode, feature_pool  # noqa: F401 (the public API)
from .models.mae import MAE_VARIANTS, MaskedAutoencoderViT
from .models.vit import VARIANTS, VisionTransformer, variant_kwargs
from .weights.backbone import load_into
from .models.pose import PoseModel, build_pose
from .weights.read import PoseWeights, Weights, default_stats, read_pose, read_weights

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
    if w.state_dict is not None:  # strict: read_weights checked names and shapes against these kwargs
        grid = tuple(model.patch_embed.grid_size)
        load_into(model, w.state_dict, grid, f"cannot load {w.source}")
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
        `fastmae segment` or `detect` run gives its encoder (the head and pyramid are left out); a `fastmae pose`
        run gives its `PoseModel` (encoder + heatmap head; `.encoder` is the ViT);
      - a fastmae export X.safetensors (+ X.json), or X without the extension (`fastmae convert --to fastmae`);
      - an official MAE .pth ({'model': state_dict}), a timm state dict (.pth/.safetensors);
      - a Hugging Face folder (config.json + weights) or weights file (ViTMAEForPreTraining, ViTMAEModel,
        ViTForImageClassification; a VitPoseForPoseEstimation folder gives a `PoseModel` with the same heatmaps);
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
    pose = read_pose(p) if is_file else None
    if pose is not None:
        return load_pose(pose).to(map_location).eval()
    if not is_file and name in MAE_VARIANTS:
        w = Weights("mae", None, variant_kwargs(name, MAE_VARIANTS, kind="MAE"), source=name)
    elif not is_file and name in VARIANTS:
        w = Weights("vit", None, variant_kwargs(name, VARIANTS), source=name)
    else:
        w = read_weights(p, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                         variant_names=sorted(MAE_VARIANTS) + sorted(VARIANTS), norm_pix_loss=norm_pix_loss)
    if w.kind == "mae" and norm_pix_loss is not None:
        w.model_kwargs["norm_pix_loss"] = norm_pix_loss
    return _attach_stats(build_model(w).to(map_location).eval(), w)


def load_pose(pw: PoseWeights) -> PoseModel:
    """The pose model of a `fastmae pose` run or a Hugging Face VitPose folder, weights loaded strictly, with
    `data_mean` / `data_std` as `load` gives them; `model.encoder` is its ViT."""
    model = build_pose(pw.kwargs)
    load_exactly(model, pw.state_dict, f"cannot load the pose model {pw.source}")
    model.data_mean, model.data_std, model.data_stats_known = pw.mean, pw.std, pw.stats_known
    model.source = pw.source
    return model


def load_exactly(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a state dict of exactly the model's names and shapes, or one ValueError starting with `what` that lists
    what is missing, left over or of another shape (a model of the checkpoint's own size: nothing to resample)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{what}: missing {missing[:6]}, unexpected {unexpected[:6]}, shape mismatches {shapes[:6]}")
    model.load_state_dict(state_dict, strict=True)


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
