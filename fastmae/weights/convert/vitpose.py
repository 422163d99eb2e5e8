"""Hugging Face `VitPoseForPoseEstimation` <-> fastmae's pose model (models/pose.py), both directions.

A fastmae pose state dict is `PoseModel.state_dict()`: 'encoder.*' (a fastmae ViT: cls_token, pos_embed, patch_embed,
blocks, norm) and 'head.*' (the names Hugging Face uses). Its kwargs ('model_kwargs' of a pose checkpoint):
{'encoder': ViT sizes, 'head': 'simple' | 'classic', 'num_keypoints', 'channels', 'sigma', 'patch_padding',
'norm_eps', 'names', 'flip', 'skeleton', 'sigmas'}. VitPose has no cls token (its backbone never uses one): it is
zero on the way in and left out on the way out. Table checked against transformers 5.25 (modeling_vitpose*.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ...models.pose import HEATMAP_UPSAMPLE, VITPOSE_PADDING
from .formats import StateDict, Table
from .tables import expand_table, from_foreign, to_foreign

VITPOSE_MARK = "backbone.embeddings.patch_embeddings.projection.weight"  # the key that says "a VitPose state dict"
VITPOSE_EMBED: Table = [
    ("encoder.pos_embed", "backbone.embeddings.position_embeddings"),
    ("encoder.patch_embed.proj.{p}", "backbone.embeddings.patch_embeddings.projection.{p}"),
]
VITPOSE_BLOCK: Table = [
    ("encoder.blocks.{i}.norm1.{p}", "backbone.encoder.layer.{i}.layernorm_before.{p}"),
    ("encoder.blocks.{i}.attn.qkv.{p}", ("backbone.encoder.layer.{i}.attention.attention.query.{p}",
                                         "backbone.encoder.layer.{i}.attention.attention.key.{p}",
                                         "backbone.encoder.layer.{i}.attention.attention.value.{p}")),
    ("encoder.blocks.{i}.attn.proj.{p}", "backbone.encoder.layer.{i}.attention.output.dense.{p}"),
    ("encoder.blocks.{i}.norm2.{p}", "backbone.encoder.layer.{i}.layernorm_after.{p}"),
    ("encoder.blocks.{i}.mlp.fc1.{p}", "backbone.encoder.layer.{i}.mlp.fc1.{p}"),
    ("encoder.blocks.{i}.mlp.fc2.{p}", "backbone.encoder.layer.{i}.mlp.fc2.{p}"),
]
VITPOSE_NORM: Table = [("encoder.norm.{p}", "backbone.layernorm.{p}")]


def is_vitpose(sd: Mapping[str, torch.Tensor]) -> bool:
    """A Hugging Face VitPose state dict (backbone + head)."""
    return VITPOSE_MARK in sd


def _pairs(depth: int, sd_keys) -> list[tuple[str, Any]]:
    """(fastmae, HF) pairs of the backbone; the head's keys are the same on both sides."""
    pairs = expand_table(VITPOSE_EMBED) + [p for i in range(depth) for p in expand_table(VITPOSE_BLOCK, i=i)]
    pairs += expand_table(VITPOSE_NORM)
    return pairs + [(k, k) for k in sorted(sd_keys) if k.startswith("head.")]


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return int(v[0]), int(v[1])
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v), int(v)
    raise ValueError(f"the VitPose config's {what} is {v!r}, not an int or a pair")


def _labels(cfg: Mapping[str, Any], K: int) -> list[str]:
    """Keypoint names from id2label when they are names (not transformers' LABEL_i placeholders)."""
    id2label = cfg.get("id2label") or {}
    names = [str(id2label.get(str(k), id2label.get(k, ""))) for k in range(K)]
    if all(n and not re.fullmatch(r"LABEL_\d+", n) for n in names):
        return names
    return [f"keypoint_{k}" for k in range(K)]


def check_config_against_weights(bb: Mapping[str, Any], pose: Mapping[str, torch.Tensor], depth: int,
                                 patch: int) -> None:
    """ValueError naming the first size a VitPose config.json states unlike its weights (a config of another model:
    the model built from it would not be the one trained)."""
    D, C, p, _ = pose["encoder.patch_embed.proj.weight"].shape
    blocks = len({k.split(".")[2] for k in pose if k.startswith("encoder.blocks.")})
    hidden = int(pose["encoder.blocks.0.mlp.fc1.weight"].shape[0]) if "encoder.blocks.0.mlp.fc1.weight" in pose else 0
    stated = {"hidden_size": (bb.get("hidden_size"), D), "num_channels": (bb.get("num_channels"), C),
              "patch_size": (patch if "patch_size" in bb else None, p), "num_hidden_layers": (depth, blocks),
              "mlp_ratio": (bb.get("mlp_ratio"), hidden / D if hidden else None)}
    for key, (said, found) in stated.items():
        if said is not None and found is not None and float(said) != float(found):
            raise ValueError(f"the VitPose config.json says {key}={said} but its weights have {found:g}: the config "
                             f"does not belong to these weights; pass the folder save_pretrained wrote")


def hf_vitpose_to_fastmae(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> tuple[StateDict, dict]:
    """A VitPose state dict and its config.json -> (fastmae pose state dict, pose kwargs). Refuses, in one line,
    what the fastmae pose model does not compute: ViTPose++ mixture-of-experts blocks, no qkv bias, another
    activation or upsampling factor, features from a block other than the last."""
    cfg = dict(config or {})
    bb = cfg.get("backbone_config") or {}
    if not isinstance(bb, Mapping):
        raise ValueError("the VitPose config.json has no backbone_config object; pass the folder save_pretrained wrote")
    if int(bb.get("num_experts", 1)) > 1:
        raise ValueError(f"a ViTPose++ mixture-of-experts checkpoint ({bb['num_experts']} experts per MLP, one per "
                         f"dataset): fastmae's pose model has one MLP per block; use a single-dataset ViTPose "
                         f"checkpoint (e.g. usyd-community/vitpose-base-simple)")
    for key, want in (("qkv_bias", True), ("hidden_act", "gelu")):
        if bb.get(key, want) != want:
            raise ValueError(f"the VitPose backbone has {key}={bb[key]!r}; fastmae's ViT blocks have {key}={want!r}")
    depth = int(bb.get("num_hidden_layers", 12))
    out = bb.get("out_indices")
    if out and int(out[-1]) not in (depth, -1):
        raise ValueError(f"the VitPose head reads block {out[-1]} of {depth}; fastmae's pose head reads the last one")
    simple = bool(cfg.get("use_simple_decoder", True))
    if simple and int(cfg.get("scale_factor", HEATMAP_UPSAMPLE)) != HEATMAP_UPSAMPLE:
        raise ValueError(f"the VitPose simple decoder upsamples x{cfg['scale_factor']}; fastmae's upsamples "
                         f"x{HEATMAP_UPSAMPLE}")
    patch = _pair(bb.get("patch_size", 16), "patch_size")
    if patch[0] != patch[1]:
        raise ValueError(f"the VitPose patches are {patch[0]}x{patch[1]}; fastmae's ViT takes square patches")
    if "head.conv.weight" not in sd:
        raise ValueError("the VitPose state dict has no head.conv.weight (the heatmap layer); pass a whole "
                         "VitPoseForPoseEstimation, not its backbone alone")
    pose = from_foreign({k: v for k, v in sd.items()}, _pairs(depth, sd), "Hugging Face VitPose")
    check_config_against_weights(bb, pose, depth, patch[0])
    D = int(pose["encoder.pos_embed"].shape[-1])
    pose["encoder.cls_token"] = torch.zeros(1, 1, D, dtype=pose["encoder.pos_embed"].dtype)
    K = int(sd["head.conv.weight"].shape[0])
    heads = int(bb.get("num_attention_heads", 12))
    kwargs = {
        "encoder": {"img_size": list(_pair(bb.get("image_size", (256, 192)), "image_size")), "patch_size": patch[0],
                    "in_chans": int(bb.get("num_channels", 3)), "embed_dim": D, "depth": depth, "num_heads": heads,
                    "mlp_ratio": float(bb.get("mlp_ratio", 4))},
        "head": "simple" if simple else "classic", "num_keypoints": K,
        "channels": 256 if simple else int(sd["head.deconv1.weight"].shape[1]), "sigma": 2.0,
        "patch_padding": VITPOSE_PADDING, "norm_eps": float(bb.get("layer_norm_eps", 1e-12)),
        "names": _labels(cfg, K), "flip": [], "skeleton": [], "sigmas": [],
        "codec": "udp",  # trained on ViTPose's UDP grid: crops and keypoints as transformers' image processor maps them
    }
    return pose, kwargs


def fastmae_to_hf_vitpose(sd: Mapping[str, torch.Tensor], kw: Mapping[str, Any]) -> tuple[StateDict, dict]:
    """A fastmae pose state dict and kwargs -> (VitPose state dict, config.json dict); a ValueError naming the
    difference where no VitPose model computes the same heatmaps."""
    pad = int(kw.get("patch_padding", 0))
    enc = kw["encoder"]
    if pad != VITPOSE_PADDING:
        raise ValueError(f"this pose model pads its patch convolution by {pad} px, Hugging Face VitPose always by "
                         f"{VITPOSE_PADDING} (it needs patches over {2 * VITPOSE_PADDING} px; this one's are "
                         f"{enc['patch_size']}): no VitPose model computes its heatmaps; keep it in fastmae's format "
                         f"(--to fastmae)")
    if kw["head"] == "classic" and int(kw.get("channels", 256)) != 256:
        raise ValueError(f"Hugging Face's classic VitPose decoder is 256 channels wide, this head {kw['channels']}; "
                         f"train with --pose.channels 256 to export it")
    ratio = float(enc.get("mlp_ratio", 4.0))
    if ratio != int(ratio):
        raise ValueError(f"Hugging Face VitPose takes an integer mlp_ratio, this encoder's is {ratio}")
    depth = int(enc["depth"])
    hf = to_foreign(dict(sd), _pairs(depth, sd))
    K = int(kw["num_keypoints"])
    names = list(kw.get("names") or [f"keypoint_{k}" for k in range(K)])
    H, W = (int(v) for v in enc["img_size"])
    config = {
        "architectures": ["VitPoseForPoseEstimation"], "model_type": "vitpose",
        "use_simple_decoder": kw["head"] == "simple", "scale_factor": HEATMAP_UPSAMPLE,
        "id2label": {str(k): n for k, n in enumerate(names)}, "label2id": {n: k for k, n in enumerate(names)},
        "backbone_config": {
            "model_type": "vitpose_backbone", "image_size": [H, W], "patch_size": [enc["patch_size"]] * 2,
            "num_channels": int(enc["in_chans"]), "hidden_size": int(enc["embed_dim"]), "num_hidden_layers": depth,
            "num_attention_heads": int(enc["num_heads"]), "mlp_ratio": int(ratio), "num_experts": 1,
            "hidden_act": "gelu", "qkv_bias": True, "layer_norm_eps": float(kw.get("norm_eps", 1e-6)),
            "out_indices": [depth],
        },
    }
    return hf, config


__all__ = ["VITPOSE_MARK", "fastmae_to_hf_vitpose", "hf_vitpose_to_fastmae", "is_vitpose"]
