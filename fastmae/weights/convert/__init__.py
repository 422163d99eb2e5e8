"""Checkpoint formats and the conversions between them: fastmae, the official MAE release, Hugging Face and timm.

Formats (`detect_format` tells them apart by their keys):

  fastmae-mae       full MAE: encoder + decoder (official `mae_visualize_vit_*.pth` / `*_full.pth`,
                    fastmae pretraining checkpoints). Official names are fastmae names.
  fastmae-encoder   MAE encoder without decoder or head (official `mae_pretrain_vit_*.pth`): `norm`, no `head`.
  fastmae-vit       classifier (official `mae_finetuned_vit_*.pth`): `head`, and `fc_norm` (avg pool) or `norm`.
  timm-vit          a timm ViT with timm-only parts (register tokens, layer scale, ...). A plain timm
                    `VisionTransformer` uses the official names, so its state dict is detected as fastmae-*.
  hf-vitmae-pretraining / hf-vitmae-model / hf-vit-classification   Hugging Face `ViTMAEForPreTraining`,
                    `ViTMAEModel` (encoder, no `vit.` prefix), `ViTForImageClassification`.

Renamings are tables of (fastmae, foreign) names with `{i}` for the block index, `{v}` for the
Hugging Face `vit.` prefix and `{p}` for weight/bias; a tuple on the foreign side is one fastmae tensor
split on dim 0 (fused qkv <-> query, key, value). Every conversion is checked against the shapes of the
fastmae model built (on the meta device) from the inferred kwargs; errors name keys and shapes.

Hugging Face has two key layouts: 'legacy' (transformers 4.x modules and every file on the Hub:
`vit.encoder.layer.{i}.attention.attention.query`) and 'modular' (what transformers >= 5 builds in
memory: `vit.layers.{i}.attention.q_proj`; its `save_pretrained` converts back to legacy names, but
writes the MAE decoder blocks as `decoder.decoder_encoder.layer.{i}`). All three are read; files are
written in the legacy layout, which every transformers version loads.

Attention heads are not in the weights (qkv is (3D, D) whatever the head count), so kwargs take
`num_heads`/`decoder_num_heads` from the caller, else from the source's config or metadata, else from
the standard widths (ENCODER_HEADS, DECODER_HEADS), else width/64 or width/32. A wrong head count loads
without error but computes something else, so pass it for non-standard widths.

Shapes: L patches, D encoder width, Dd decoder width, p patch, C channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .formats import (
    DECODER_HEADS,
    ENCODER_HEADS,
    Format,
    HFStyle,
    Kind,
    StateDict,
    Target,
    check_kwargs_against_weights,
    check_state_dict,
    default_num_heads,
    detect_format,
    expected_shapes,
    infer_mae_kwargs,
    infer_vit_kwargs,
    kind_of,
    unwrap_state_dict,
)
from .files import (
    HF_PREPROCESSOR,
    HF_WEIGHT_FILES,
    hf_preprocessor_config,
    read_file,
    save_fastmae,
    save_hf,
    save_official,
    save_timm,
)
from .hf import (
    fastmae_to_hf_mae,
    fastmae_to_hf_vit,
    hf_key_map,
    hf_mae_to_fastmae,
    hf_vit_to_fastmae,
)
from ...tasks import DENSE_KINDS
from .tables import fastmae_to_timm, mae_encoder, timm_to_fastmae
from .vitpose import fastmae_to_hf_vitpose, hf_vitpose_to_fastmae, is_vitpose


def dense_task_encoder(sd: StateDict, config: Mapping[str, Any]) -> tuple[StateDict, dict, int, Any]:
    """A dense-task checkpoint (`fastmae segment`, `detect`, `pose`) as its encoder: the weights under 'encoder.'
    (the head and the feature pyramid stay behind), the metadata without the task model's kwargs, and its encoder's
    heads (0: unknown) and image size (None: unknown)."""
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    kw = config.get("model_kwargs")
    enc_kw = kw.get("encoder") if isinstance(kw, Mapping) else None
    heads = int(enc_kw.get("num_heads", 0)) if isinstance(enc_kw, Mapping) else 0
    size = enc_kw.get("img_size") if isinstance(enc_kw, Mapping) else None
    return enc, {k: v for k, v in config.items() if k not in ("kind", "model_kwargs")}, heads, size


def to_fastmae(sd: StateDict, config: Mapping[str, Any], num_heads: int = 0, decoder_num_heads: int = 0,
               img_size=None) -> tuple[Kind, StateDict, dict, dict]:
    """Any supported state dict -> (kind, fastmae state dict, model kwargs, extra meta).

    config: HF config.json or fastmae sidecar metadata ({} if none). Heads: explicit > config > table.
    """
    source = ""
    if is_vitpose(sd):  # a Hugging Face VitPose: its encoder, as that of a fastmae pose model
        sd, pose_kw = hf_vitpose_to_fastmae(sd, config)
        config, source = {"kind": "pose", "model_kwargs": pose_kw}, "hf-vitpose"
    dense = "encoder.patch_embed.proj.weight" in sd and "patch_embed.proj.weight" not in sd  # an encoder under a head
    dense_kind = config.get("kind") if config.get("kind") in DENSE_KINDS else DENSE_KINDS[0]
    if dense:  # its encoder, sizes from the weights
        sd, config, heads, size = dense_task_encoder(sd, config)
        num_heads = num_heads or heads
        img_size = img_size or (tuple(size) if isinstance(size, (list, tuple)) else size)
    fmt = detect_format(sd)
    extra: dict[str, Any] = {"source_format": source or (f"fastmae-{dense_kind}" if dense else fmt)}
    if fmt == "hf-vitmae-pretraining":
        out, kw = hf_mae_to_fastmae(sd, config or None, num_heads, decoder_num_heads)
        extra["mask_ratio"] = float(config.get("mask_ratio", 0.75)) if config else 0.75
        return "mae", out, kw, extra
    if fmt in ("hf-vit-classification", "hf-vitmae-model"):
        out, kw = hf_vit_to_fastmae(sd, config or None, num_heads)
        return kind_of(fmt), out, kw, extra
    sd = timm_to_fastmae(sd) if fmt == "timm-vit" else dict(sd)
    kind = kind_of(fmt)
    kw = dict(config.get("model_kwargs") or {}) if config.get("kind") in (None, kind) else {}
    if kw:
        check_kwargs_against_weights(sd, kind, kw, "the metadata beside the weights (model_kwargs)")
    else:
        kw = (infer_mae_kwargs(sd, img_size, num_heads, decoder_num_heads) if kind == "mae"
              else infer_vit_kwargs(sd, img_size, num_heads))
    if num_heads:
        kw["num_heads"] = num_heads
    if decoder_num_heads and kind == "mae":
        kw["decoder_num_heads"] = decoder_num_heads
    mask_ratio = config.get("mask_ratio", ((config.get("config") or {}).get("model") or {}).get("mask_ratio"))
    if mask_ratio is not None:  # fastmae metadata: top level, or the pretraining config's model section
        extra["mask_ratio"] = float(mask_ratio)
    for key in ("mean", "std"):  # the data normalisation the model was trained with (fastmae metadata)
        if isinstance(config.get(key), (list, tuple)) and config[key]:
            extra[key] = [float(v) for v in config[key]]
    check_state_dict(sd, kind, kw)
    return kind, sd, kw, extra


__all__ = [
    "DECODER_HEADS", "ENCODER_HEADS", "HF_PREPROCESSOR", "HF_WEIGHT_FILES", "Format", "HFStyle", "Kind", "StateDict", "Target",
    "check_state_dict", "default_num_heads", "detect_format", "expected_shapes",
    "fastmae_to_hf_mae", "fastmae_to_hf_vit", "fastmae_to_hf_vitpose", "hf_vitpose_to_fastmae", "is_vitpose", "fastmae_to_timm", "hf_key_map", "hf_mae_to_fastmae",
    "hf_preprocessor_config", "hf_vit_to_fastmae", "infer_mae_kwargs", "infer_vit_kwargs", "kind_of", "mae_encoder",
    "read_file", "save_fastmae", "save_hf", "save_official", "save_timm", "timm_to_fastmae", "to_fastmae",
    "unwrap_state_dict",
]
