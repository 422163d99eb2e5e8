"""Hugging Face ViTMAE / ViT: key tables for the legacy and modular layouts, configs, both directions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from ...models.pos_embed import sincos_2d
from ...models.vit import LN_EPS
from .formats import (
    DECODER_HINT,
    HFStyle,
    Kind,
    StateDict,
    Table,
    check_state_dict,
    detect_format,
    infer_mae_kwargs,
    infer_vit_kwargs,
    num_blocks,
)
from .tables import expand_table, from_foreign, to_foreign

# Hugging Face: tables verified against transformers 5.24 (modeling_vit_mae.py, modeling_vit.py and the
# legacy names in conversion_mapping.py) and the files its save_pretrained writes.

HF_EMBED: Table = [
    ("cls_token", "{v}embeddings.cls_token"),
    ("pos_embed", "{v}embeddings.position_embeddings"),  # an nn.Parameter in HF (frozen sin-cos for ViTMAE)
    ("patch_embed.proj.{p}", "{v}embeddings.patch_embeddings.projection.{p}"),
]
HF_ENCODER_NORM: Table = [("norm.{p}", "{v}layernorm.{p}")]
HF_DECODER_IN: Table = [
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    ("decoder_embed.{p}", "decoder.decoder_embed.{p}"),
]
HF_DECODER_OUT: Table = [
    ("decoder_norm.{p}", "decoder.decoder_norm.{p}"),
    ("decoder_pred.{p}", "decoder.decoder_pred.{p}"),
]
HF_HEAD: Table = [("head.{p}", "classifier.{p}")]  # HF ViT classifies the cls token after `layernorm`
# One transformer block: (fastmae, legacy, modular) suffixes.
HF_BLOCK: list[tuple[str, Any, Any]] = [
    ("norm1.{p}", "layernorm_before.{p}", "layernorm_before.{p}"),
    ("attn.qkv.{p}",
     ("attention.attention.query.{p}", "attention.attention.key.{p}", "attention.attention.value.{p}"),
     ("attention.q_proj.{p}", "attention.k_proj.{p}", "attention.v_proj.{p}")),
    ("attn.proj.{p}", "attention.output.dense.{p}", "attention.o_proj.{p}"),
    ("norm2.{p}", "layernorm_after.{p}", "layernorm_after.{p}"),
    ("mlp.fc1.{p}", "intermediate.dense.{p}", "mlp.fc1.{p}"),
    ("mlp.fc2.{p}", "output.dense.{p}", "mlp.fc2.{p}"),
]
# Block prefixes: (fastmae, legacy, modular).
HF_ENCODER_BLOCKS = ("blocks.{i}.", "{v}encoder.layer.{i}.", "{v}layers.{i}.")
HF_DECODER_BLOCKS = ("decoder_blocks.{i}.", "decoder.decoder_layers.{i}.", "decoder.decoder_layers.{i}.")
# Other writers' names for the same tensors, rewritten to legacy names before mapping:
# transformers 5.x save_pretrained renames 'decoder_layers.' too when it restores 'encoder.layer.'.
HF_READ_ALIASES = [("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")]


def _blocks(prefixes: tuple[str, str, str], style: str, n: int, v: str) -> list[tuple[str, Any]]:
    """Expanded (fastmae, HF) pairs of n blocks in the given layout."""
    col = 1 if style == "legacy" else 2
    fm_pre, fo_pre = prefixes[0], prefixes[col]
    rows = [(fm_pre + row[0], tuple(fo_pre + s for s in row[col]) if isinstance(row[col], tuple)
             else fo_pre + row[col]) for row in HF_BLOCK]
    return [pair for i in range(n) for pair in expand_table(rows, i=i, v=v)]


def hf_key_map(kind: Kind, depth: int, decoder_depth: int = 0, style: str = "legacy",
               prefix: str = "vit.", head: bool = True) -> list[tuple[str, Any]]:
    """All (fastmae, Hugging Face) key pairs of one model; style 'legacy' or 'modular'."""
    if style not in ("legacy", "modular"):
        raise ValueError(f"Hugging Face layout must be 'legacy' or 'modular', got {style!r}")
    pairs = expand_table(HF_EMBED, v=prefix) + _blocks(HF_ENCODER_BLOCKS, style, depth, prefix)
    pairs += expand_table(HF_ENCODER_NORM, v=prefix)
    if kind == "mae":
        pairs += expand_table(HF_DECODER_IN) + _blocks(HF_DECODER_BLOCKS, style, decoder_depth, prefix)
        pairs += expand_table(HF_DECODER_OUT)
    if kind == "vit" and head:
        pairs += expand_table(HF_HEAD)
    return pairs


def hf_style(keys) -> str:
    """'modular' if the keys use transformers >= 5 module names (layers.N, q_proj), else 'legacy'."""
    rx = re.compile(r"(^|\.)layers\.\d+\.|\.q_proj\.")
    return "modular" if any(rx.search(k) for k in keys) else "legacy"


@lru_cache(maxsize=1)
def installed_hf_style() -> str:
    """The layout that the installed transformers builds in memory (its model.state_dict() names)."""
    tf = _transformers()
    cfg = tf.ViTMAEConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                          image_size=4, patch_size=4)
    with torch.device("meta"):
        keys = list(tf.ViTMAEModel(cfg).state_dict())
    return hf_style(keys)


def _transformers():
    """The transformers module, imported lazily: fastmae itself does not need it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("Hugging Face conversion needs transformers: pip install 'fastmae[hf]'") from e
    return transformers


def _read_aliases(hf_sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rewrite other writers' names (HF_READ_ALIASES) to the legacy ones."""
    out = {}
    for k, v in hf_sd.items():
        for old, new in HF_READ_ALIASES:
            if old in k:
                k = k.replace(old, new)
        out[k] = v
    return out


def cfg_dict(hf_config) -> dict:
    """A transformers config object or a parsed config.json, as a dict."""
    if hf_config is None:
        return {}
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


MAX_POSITIONS = 65536  # a 256 x 256 patch grid: larger rebuilt position tables are refused, not allocated
_HF_SIZES = ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "num_channels", "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
             "decoder_intermediate_size")


def check_config_sizes(cfg: Mapping[str, Any], sd: Mapping[str, torch.Tensor], enc: str, dec: str = "") -> None:
    """A config.json's sizes are positive integers (image_size up to 65536) and its block counts are the weights'
    own, checked before anything is built from them: a crafted `num_hidden_layers: 3000000` is refused."""
    for key in _HF_SIZES:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, list, tuple))
                              or any(not isinstance(x, int) or x < 0 for x in (v if isinstance(v, (list, tuple))
                                                                               else [v]))):
            raise ValueError(f"config.json: {key} must be a positive integer, got {v!r}")
    img = cfg.get("image_size")
    if img is not None:
        sides = img if isinstance(img, (list, tuple)) else [img]
        if isinstance(img, bool) or not all(isinstance(x, int) and 1 <= x <= 65536 for x in sides):
            raise ValueError(f"config.json: image_size must be an integer (or two) in [1, 65536], got {img!r}")
    for key, prefix in (("num_hidden_layers", enc), ("decoder_num_hidden_layers", dec)):
        if prefix and cfg.get(key) is not None:
            found = num_blocks(sd, prefix)
            if found and cfg[key] != found:
                raise ValueError(f"config.json says {key}={cfg[key]} but the weights have {found} blocks; "
                                 f"the config does not belong to these weights")


def _check_hf_config(cfg: Mapping[str, Any]) -> None:
    """Refuse settings fastmae's blocks cannot reproduce (its LayerNorm eps is read: `norm_eps`)."""
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported: fastmae blocks use exact GELU")
    if not cfg.get("qkv_bias", True):
        raise ValueError("qkv_bias=False is not supported: fastmae's attention has a qkv bias")


def _hf_image_kwargs(cfg: Mapping[str, Any]) -> dict:
    """img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio of an HF ViT/ViTMAE config, and
    norm_eps where its layer_norm_eps is not fastmae's 1e-6 (HF's default is 1e-12)."""
    img, patch = cfg["image_size"], cfg["patch_size"]
    if isinstance(patch, (list, tuple)):
        if patch[0] != patch[1]:
            raise ValueError(f"non-square patches {patch} are not supported")
        patch = patch[0]
    if isinstance(img, (list, tuple)):
        img = int(img[0]) if img[0] == img[1] else (int(img[0]), int(img[1]))
    D = cfg["hidden_size"]
    kw = dict(img_size=img, patch_size=int(patch), in_chans=cfg.get("num_channels", 3), embed_dim=D,
              depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
              mlp_ratio=cfg["intermediate_size"] / D)
    eps = float(cfg.get("layer_norm_eps", LN_EPS))
    return kw if eps == LN_EPS else {**kw, "norm_eps": eps}


def hf_mae_to_fastmae(hf_sd: Mapping[str, torch.Tensor], hf_config=None, num_heads: int = 0,
                      decoder_num_heads: int = 0) -> tuple[StateDict, dict]:
    """A Hugging Face ViTMAEForPreTraining state dict (any layout) -> (fastmae MAE state dict, MAE kwargs).

    hf_config: a ViTMAEConfig or parsed config.json; without one the kwargs are inferred from the weights.
    Explicit num_heads/decoder_num_heads override the config. Missing sin-cos position embeddings are
    rebuilt (they are fixed; HF's equal fastmae's sincos_2d).
    """
    fmt = detect_format(hf_sd)
    if fmt != "hf-vitmae-pretraining":
        raise ValueError(f"expected a ViTMAEForPreTraining state dict ('vit.*' and 'decoder.*' keys), got {fmt}"
                         + (f". {DECODER_HINT}" if fmt in ("hf-vitmae-model", "hf-vit-classification") else ""))
    sd = _read_aliases(hf_sd)
    style = hf_style(sd)
    cfg = cfg_dict(hf_config)
    enc = HF_ENCODER_BLOCKS[1 if style == "legacy" else 2].replace("{v}", "vit.")
    check_config_sizes(cfg, sd, enc, HF_DECODER_BLOCKS[1])
    depth = cfg.get("num_hidden_layers") or num_blocks(sd, enc)
    dec_depth = cfg.get("decoder_num_hidden_layers", num_blocks(sd, HF_DECODER_BLOCKS[1]))
    pairs = hf_key_map("mae", depth, dec_depth, style)
    _fill_fixed_pos_embeds(sd, pairs, cfg)
    out = from_foreign(sd, pairs, "Hugging Face ViTMAEForPreTraining", {"decoder.": DECODER_HINT})
    if cfg:
        _check_hf_config(cfg)
        kw = _hf_image_kwargs(cfg)
        Dd = cfg["decoder_hidden_size"]
        if cfg["decoder_intermediate_size"] / Dd != kw["mlp_ratio"]:
            raise ValueError("decoder_intermediate_size/decoder_hidden_size differs from the encoder's MLP ratio; "
                             "fastmae uses one mlp_ratio for both")
        kw.update(decoder_embed_dim=Dd, decoder_depth=cfg["decoder_num_hidden_layers"],
                  decoder_num_heads=cfg["decoder_num_attention_heads"],
                  norm_pix_loss=bool(cfg.get("norm_pix_loss", False)))
        kw["num_heads"] = num_heads or kw["num_heads"]
        kw["decoder_num_heads"] = decoder_num_heads or kw["decoder_num_heads"]
    else:
        kw = infer_mae_kwargs(out, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    check_state_dict(out, "mae", kw, {fm: fo if isinstance(fo, str) else ", ".join(fo) for fm, fo in pairs})
    return out, kw


def _fill_fixed_pos_embeds(sd: StateDict, pairs, cfg: Mapping[str, Any]) -> None:
    """Rebuild ViTMAE's fixed sin-cos position embeddings where a writer left them out."""
    names = {fm: fo for fm, fo in pairs if isinstance(fo, str)}
    proj = sd.get(names["patch_embed.proj.weight"])  # (D, C, p, p)
    for fm, width_key in (("pos_embed", "cls_token"), ("decoder_pos_embed", "mask_token")):
        hf_name, width_name = names.get(fm), names.get(width_key)
        if hf_name is None or hf_name in sd or width_name not in sd or proj is None:
            continue
        img = cfg.get("image_size")
        if img is None:
            raise ValueError(f"{hf_name!r} is missing and there is no config.json to rebuild it from")
        H, W = (img, img) if isinstance(img, int) else img
        grid = (H // proj.shape[-1], W // proj.shape[-1])
        if grid[0] * grid[1] > MAX_POSITIONS:
            raise ValueError(f"config image_size {img} with patch {proj.shape[-1]} asks for {grid[0] * grid[1]} "
                             f"positions (at most {MAX_POSITIONS}); the config does not belong to these weights")
        sd[hf_name] = sincos_2d(*grid, sd[width_name].shape[-1], cls_token=True).unsqueeze(0)  # (1, 1+L, D)


def fastmae_to_hf_mae(sd: Mapping[str, torch.Tensor], mae_kwargs: Mapping[str, Any], mask_ratio: float = 0.75,
                      style: HFStyle = "auto") -> tuple[StateDict, Any]:
    """A fastmae/official MAE state dict -> (ViTMAEForPreTraining state dict, transformers.ViTMAEConfig).

    style 'auto' = the installed transformers' in-memory layout (load with model.load_state_dict);
    'legacy' = the Hub-file layout that from_pretrained of every version reads (what save_hf should get).
    """
    kw = dict(mae_kwargs)
    if kw.get("decoder", "self") != "self":
        raise ValueError("this MAE has a cross-attention decoder (--model.decoder cross), which Hugging Face's "
                         "ViTMAEForPreTraining cannot hold; --to timm writes its encoder (the names and shapes of MAE's), "
                         "--to fastmae the whole model")
    check_state_dict(sd, "mae", kw)
    style = installed_hf_style() if style == "auto" else style
    hf_sd = to_foreign(sd, hf_key_map("mae", kw["depth"], kw["decoder_depth"], style))
    D, Dd = kw["embed_dim"], kw["decoder_embed_dim"]
    ratio = kw.get("mlp_ratio", 4.0)
    config = _transformers().ViTMAEConfig(
        **_hf_common_config(kw), intermediate_size=int(D * ratio),
        decoder_hidden_size=Dd, decoder_num_hidden_layers=kw["decoder_depth"],
        decoder_num_attention_heads=kw["decoder_num_heads"], decoder_intermediate_size=int(Dd * ratio),
        mask_ratio=mask_ratio, norm_pix_loss=bool(kw.get("norm_pix_loss", False)),
        architectures=["ViTMAEForPreTraining"],
    )
    return hf_sd, config


def _hf_common_config(kw: Mapping[str, Any]) -> dict:
    """Config fields shared by ViTConfig and ViTMAEConfig, with the model's LayerNorm eps and exact GELU."""
    img = kw.get("img_size", 224)
    img = img if isinstance(img, int) else (int(img[0]) if img[0] == img[1] else [int(img[0]), int(img[1])])
    return dict(image_size=img, patch_size=kw["patch_size"], num_channels=kw.get("in_chans", 3),
                hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
                hidden_act="gelu", layer_norm_eps=float(kw.get("norm_eps", LN_EPS)), qkv_bias=True,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_vit_to_fastmae(hf_sd: Mapping[str, torch.Tensor], hf_config=None, num_heads: int = 0
                      ) -> tuple[StateDict, dict]:
    """A Hugging Face ViTForImageClassification (-> classifier, global_pool='token') or ViTMAEModel
    (-> encoder, num_classes=0) state dict, any layout -> (fastmae state dict, VisionTransformer kwargs)."""
    fmt = detect_format(hf_sd)
    if fmt not in ("hf-vit-classification", "hf-vitmae-model"):
        raise ValueError(f"expected a ViTForImageClassification or ViTMAEModel state dict, got {fmt}")
    sd = _read_aliases(hf_sd)
    style, v = hf_style(sd), ("vit." if fmt == "hf-vit-classification" else "")
    cfg = cfg_dict(hf_config)
    enc = HF_ENCODER_BLOCKS[1 if style == "legacy" else 2].replace("{v}", v)
    check_config_sizes(cfg, sd, enc)
    depth = cfg.get("num_hidden_layers") or num_blocks(sd, enc)
    head = "classifier.weight" in sd
    pairs = hf_key_map("vit", depth, style=style, prefix=v, head=head)
    if fmt == "hf-vitmae-model":  # fixed sin-cos; ViT's own position embeddings are learned
        _fill_fixed_pos_embeds(sd, pairs, cfg)
    out = from_foreign(sd, pairs, f"Hugging Face {fmt}")
    if cfg:
        _check_hf_config(cfg)
        kw = _hf_image_kwargs(cfg)
        kw.update(num_classes=out["head.weight"].shape[0] if head else 0, global_pool="token")
        kw["num_heads"] = num_heads or kw["num_heads"]
    else:
        kw = infer_vit_kwargs(out, num_heads=num_heads)
    kind: Kind = "vit" if head else "encoder"
    check_state_dict(out, kind, kw, {fm: fo if isinstance(fo, str) else ", ".join(fo) for fm, fo in pairs})
    return out, kw


def fastmae_to_hf_vit(sd: Mapping[str, torch.Tensor], vit_kwargs: Mapping[str, Any], style: HFStyle = "auto",
                      mask_ratio: float = 0.75) -> tuple[StateDict, Any]:
    """A fastmae ViT with a head -> (ViTForImageClassification state dict, ViTConfig); without a head
    (an encoder) -> (ViTMAEModel state dict, ViTMAEConfig). Needs global_pool='token' (`norm`): HF
    classifies the cls token after `layernorm`, so an avg-pool `fc_norm` model has no HF equivalent."""
    kw = dict(vit_kwargs)
    if kw.get("global_pool", "token") != "token" or "fc_norm.weight" in sd:
        raise ValueError(
            "this ViT uses global average pooling with 'fc_norm'; Hugging Face ViTForImageClassification "
            "classifies the cls token after 'layernorm' (global_pool='token'), so it cannot hold this model. "
            "Convert to fastmae, official or timm instead."
        )
    kw.setdefault("num_classes", sd["head.weight"].shape[0] if "head.weight" in sd else 0)
    kw["global_pool"] = "token"
    head = kw["num_classes"] > 0
    check_state_dict(sd, "vit" if head else "encoder", kw)
    style = installed_hf_style() if style == "auto" else style
    tf = _transformers()
    common = dict(**_hf_common_config(kw), intermediate_size=int(kw["embed_dim"] * kw.get("mlp_ratio", 4.0)))
    if head:
        hf_sd = to_foreign(sd, hf_key_map("vit", kw["depth"], style=style, prefix="vit."))
        n = kw["num_classes"]
        config = tf.ViTConfig(**common, num_labels=n, architectures=["ViTForImageClassification"])
    else:
        hf_sd = to_foreign(sd, hf_key_map("encoder", kw["depth"], style=style, prefix=""))
        config = tf.ViTMAEConfig(**common, mask_ratio=mask_ratio, architectures=["ViTMAEModel"])
    return hf_sd, config
