"""Convert checkpoints between fastmae, the official MAE release, Hugging Face and timm.

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

import json
import math
import re
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import atomic_write, safe_join, torch_load
from .config import ConvertConfig, validate
from .mae import DECODER_PAPER, DECODER_SMALL
from .pos_embed import sincos_2d
from .vit import ENCODER_SIZES, LN_EPS

Format = Literal[
    "fastmae-mae", "fastmae-vit", "fastmae-encoder",
    "hf-vitmae-pretraining", "hf-vitmae-model", "hf-vit-classification", "timm-vit",
]
Kind = Literal["mae", "vit", "encoder"]
HFStyle = Literal["auto", "legacy", "modular"]
Target = Literal["fastmae", "hf", "timm", "official"]
Table = list[tuple[str, Any]]  # (fastmae pattern, foreign pattern or tuple of patterns)
StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Heads: not in the weights, so they come from a table of the standard widths.

ENCODER_HEADS: dict[int, int] = {kw["embed_dim"]: kw["num_heads"] for kw in ENCODER_SIZES.values()}
DECODER_HEADS: dict[int, int] = {
    d["decoder_embed_dim"]: d["decoder_num_heads"] for d in (DECODER_PAPER, DECODER_SMALL)
}


def default_num_heads(width: int, table: Mapping[int, int] = ENCODER_HEADS) -> int:
    """Heads for a width: the standard table (ViT-Ti/S/B/L/H, MAE decoders), else head dim 64, else 32."""
    if width in table:
        return table[width]
    for head_dim in (64, 32):
        if width % head_dim == 0:
            return width // head_dim
    raise ValueError(f"cannot guess the number of attention heads for width {width}; pass num_heads explicitly")


# ---------------------------------------------------------------------------------------------------
# Unwrapping and format detection.

WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")  # official / Lightning / DDP wrappers
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
# Keys only timm ViTs have; fastmae has no module for them.
TIMM_ONLY = (".reg_token", ".dist_token", ".head_dist.", ".norm_pre.", ".attn_pool.", ".patch_embed.norm.",
             ".ls1.", ".ls2.", ".attn.q_norm.", ".attn.k_norm.", ".attn.norm.", ".mlp.norm.", ".mlp.fc1_g.")
DECODER_PREFIXES = ("decoder_", "mask_token")


def unwrap(obj: Any) -> StateDict:
    """The flat state dict inside a checkpoint: takes {'model': sd} (official), 'state_dict', and
    strips DDP's `module.` / torch.compile's `_orig_mod.` prefixes."""
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"no state dict found in the checkpoint: its top-level keys are {_names(list(obj))}; "
                f"expected a dict of tensors or one under {', '.join(repr(k) for k in WRAPPER_KEYS)}"
            )
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"expected a state dict (a dict of tensors), got {type(obj).__name__}")
    sd = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def detect_format(sd: Mapping[str, torch.Tensor]) -> Format:
    """Which model a state dict belongs to, from its keys alone (see the module docstring)."""
    keys = list(sd)
    if any(k.startswith("vit.embeddings.") for k in keys):
        return "hf-vitmae-pretraining" if any(k.startswith("decoder.") for k in keys) else "hf-vit-classification"
    if "embeddings.patch_embeddings.projection.weight" in sd:
        return "hf-vitmae-model"
    if "patch_embed.proj.weight" in sd:
        if any(t in "." + k for k in keys for t in TIMM_ONLY):
            return "timm-vit"
        if any(k.startswith(DECODER_PREFIXES) for k in keys):
            return "fastmae-mae"
        return "fastmae-vit" if "head.weight" in sd else "fastmae-encoder"
    raise ValueError(
        f"unrecognised checkpoint: no patch embedding key ('patch_embed.proj.weight' or Hugging Face "
        f"'...embeddings.patch_embeddings.projection.weight'); first keys: {_names(keys)}"
    )


def kind_of(fmt: Format) -> Kind:
    """The fastmae model a format converts to."""
    return {"fastmae-mae": "mae", "hf-vitmae-pretraining": "mae", "fastmae-encoder": "encoder",
            "hf-vitmae-model": "encoder"}.get(fmt, "vit")  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# Constructor kwargs from the weights.

def _num_blocks(keys, prefix: str) -> int:
    """Number of blocks `prefix.{i}.` among the keys; they must be numbered 0..n-1."""
    rx = re.compile(re.escape(prefix).replace(r"\{i\}", r"(\d+)"))
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    if found and found != set(range(max(found) + 1)):
        gaps = sorted(set(range(max(found) + 1)) - found)
        raise ValueError(f"blocks {prefix.format(i=gaps[0])}... missing: indices {gaps} of 0..{max(found)}")
    return len(found)


def _grid(n_pos: int, patch: int, img_size, what: str) -> tuple[int, int]:
    """Image (H, W) for a position embedding with 1 + n_pos rows: img_size if given, else a square grid."""
    if img_size and tuple(img_size) != (0, 0):
        H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if (H // patch) * (W // patch) != n_pos:
            raise ValueError(
                f"img_size {H}x{W} with patch {patch} gives {(H // patch) * (W // patch)} patches, "
                f"but {what} has {n_pos} patch positions"
            )
        return H, W
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        extra = ""
        if math.isqrt(n_pos + 1) ** 2 == n_pos + 1:
            extra = " (or it has no cls-token row, as timm's no_embed_class models: not supported)"
        raise ValueError(f"{what} has {n_pos} patch positions, not a square grid{extra}; pass img_size=(H, W)")
    return side * patch, side * patch


def infer_vit_kwargs(sd: Mapping[str, torch.Tensor], img_size=None, num_heads: int = 0) -> dict:
    """VisionTransformer kwargs from a fastmae/official/timm ViT or encoder state dict.

    img_size: (H, W), needed only when the grid is not square; num_heads: 0 = default_num_heads(D).
    global_pool is 'avg' when fc_norm.* is present, else 'token'; num_classes is 0 without a head.
    """
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in sd:
            raise ValueError(f"cannot infer the model: key {key!r} is missing; first keys: {_names(list(sd))}")
    D, C, p, q = sd["patch_embed.proj.weight"].shape  # (D, C, p, p)
    if p != q:
        raise ValueError(f"non-square patches {p}x{q} are not supported")
    depth = _num_blocks(sd, "blocks.{i}.")
    if depth == 0:
        raise ValueError("no transformer blocks ('blocks.0.*') in the state dict")
    kw = dict(
        img_size=_grid(sd["pos_embed"].shape[1] - 1, p, img_size, "pos_embed"),
        patch_size=p, in_chans=C, embed_dim=D, depth=depth,
        num_heads=num_heads or default_num_heads(D, ENCODER_HEADS),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        global_pool="avg" if "fc_norm.weight" in sd else "token",
    )
    if kw["img_size"][0] == kw["img_size"][1]:
        kw["img_size"] = kw["img_size"][0]
    return kw


def infer_mae_kwargs(
    sd: Mapping[str, torch.Tensor], img_size=None, num_heads: int = 0, decoder_num_heads: int = 0
) -> dict:
    """MaskedAutoencoderViT kwargs from a full MAE state dict (official or fastmae names).

    norm_pix_loss is not in the weights: it is left out (the model default, False); pass it yourself.
    """
    missing = [k for k in ("decoder_embed.weight", "decoder_pred.weight", "mask_token") if k not in sd]
    if missing:
        raise ValueError(f"not a full MAE state dict: missing {_names(missing)}. {DECODER_HINT}")
    kw = infer_vit_kwargs(sd, img_size, num_heads)
    for k in ("num_classes", "global_pool"):
        kw.pop(k)
    Dd = sd["decoder_embed.weight"].shape[0]  # (Dd, D)
    kw.update(
        decoder_embed_dim=Dd, decoder_depth=_num_blocks(sd, "decoder_blocks.{i}."),
        decoder_num_heads=decoder_num_heads or default_num_heads(Dd, DECODER_HEADS),
    )
    if kw["decoder_depth"] and sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / Dd != kw["mlp_ratio"]:
        raise ValueError("the decoder's MLP ratio differs from the encoder's; fastmae uses one mlp_ratio for both")
    return kw


# ---------------------------------------------------------------------------------------------------
# Checks against the fastmae model.

DECODER_HINT = (
    "An encoder-only checkpoint (official mae_pretrain_vit_*.pth, a fastmae 'encoder') has no decoder; "
    "the official *_full.pth / mae_visualize_vit_*.pth checkpoints and fastmae pretraining checkpoints have it."
)
HEAD_HINT = "A pre-trained encoder has no classifier head; fine-tune it first (fastmae finetune)."


def _names(keys: list[str], limit: int = 8) -> str:
    """'a, b, c ... and N more' for error messages."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def expected_shapes(kind: Kind, model_kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the fastmae model for `kind`, built without allocating its weights."""
    from .mae import MaskedAutoencoderViT
    from .vit import VisionTransformer

    if kind == "mae":
        with torch.device("meta"):
            model = MaskedAutoencoderViT(**model_kwargs)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # VisionTransformer reads its drop-path schedule from a tensor, which the meta device cannot:
    # build one block on the CPU and repeat its shapes.
    depth = int(model_kwargs.get("depth", 12))
    one = VisionTransformer(**{**model_kwargs, "depth": 1}).state_dict()
    out: dict[str, tuple[int, ...]] = {}
    for k, v in one.items():
        if k.startswith("blocks.0."):
            out.update({f"blocks.{i}.{k[len('blocks.0.'):]}": tuple(v.shape) for i in range(depth)})
        else:
            out[k] = tuple(v.shape)
    return out


def check_state_dict(
    sd: Mapping[str, torch.Tensor], kind: Kind, model_kwargs: Mapping[str, Any],
    source_names: Mapping[str, str] | None = None,
) -> None:
    """Raise a ValueError naming missing/unexpected keys and shape mismatches against the fastmae model.

    source_names maps a fastmae key to the checkpoint's own name for it, to name both in the message.
    """
    exp = expected_shapes(kind, model_kwargs)
    aka = source_names or {}
    named = lambda k: f"{k!r}" + (f" ({aka[k]!r} in the checkpoint)" if k in aka else "")  # noqa: E731
    missing = [k for k in exp if k not in sd]
    unexpected = [k for k in sd if k not in exp]
    shapes = [f"{named(k)} is {tuple(sd[k].shape)} in the checkpoint but {exp[k]} in the model"
              for k in exp if k in sd and tuple(sd[k].shape) != exp[k]]
    problems = []
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]))
    if missing:
        hint = " " + DECODER_HINT if any(k.startswith(DECODER_PREFIXES) for k in missing) else ""
        hint += " " + HEAD_HINT if "head.weight" in missing else ""
        problems.append(f"missing keys {_names(missing)}.{hint}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if problems:
        kw = ", ".join(f"{k}={v}" for k, v in model_kwargs.items())
        raise ValueError(f"state dict does not fit the fastmae {kind} ({kw}): " + " | ".join(problems))


# ---------------------------------------------------------------------------------------------------
# Table machinery.

def _expand(table: Table, **fields) -> list[tuple[str, Any]]:
    """Fill {i}/{v} in a table and expand {p} into weight and bias rows."""
    out = []
    for fm, fo in table:
        for p in ("weight", "bias") if "{p}" in fm else (None,):
            fill = lambda s: s.format(p=p, **fields)  # noqa: E731
            out.append((fill(fm), tuple(map(fill, fo)) if isinstance(fo, tuple) else fill(fo)))
    return out


def _to_foreign(sd: Mapping[str, torch.Tensor], pairs: list[tuple[str, Any]]) -> StateDict:
    """Rename fastmae -> foreign; a tuple target splits the tensor on dim 0 into equal parts."""
    out: StateDict = {}
    for fm, fo in pairs:
        t = sd[fm]
        if isinstance(fo, tuple):
            if t.shape[0] % len(fo):
                raise ValueError(f"{fm!r} {tuple(t.shape)} cannot be split into {len(fo)} equal parts on dim 0")
            for name, part in zip(fo, t.chunk(len(fo), dim=0)):  # (3D, D) -> 3 x (D, D)
                out[name] = part.clone()  # own storage, so safetensors can save it
        else:
            out[fo] = t
    return out


def _from_foreign(sd: Mapping[str, torch.Tensor], pairs: list[tuple[str, Any]], what: str,
                  hints: Mapping[str, str] | None = None) -> StateDict:
    """Rename foreign -> fastmae (tuple sources concatenated on dim 0); every key must be used exactly.

    hints: {substring: advice} added to the error when a missing key contains the substring.
    """
    wanted = [n for _, fo in pairs for n in (fo if isinstance(fo, tuple) else (fo,))]
    missing = [n for n in wanted if n not in sd]
    unexpected = sorted(set(sd) - set(wanted))
    if missing or unexpected:
        parts = [f"missing keys {_names(missing)}" if missing else "",
                 f"unexpected keys {_names(unexpected)}" if unexpected else ""]
        advice = [h for sub, h in (hints or {}).items() if any(sub in k for k in missing)]
        raise ValueError(f"{what} state dict: " + "; ".join(p for p in parts if p) + ". " + " ".join(advice))
    out: StateDict = {}
    for fm, fo in pairs:
        if isinstance(fo, tuple):
            parts = [sd[n] for n in fo]
            if len({tuple(t.shape) for t in parts}) != 1:
                shapes = ", ".join(f"{n!r} {tuple(t.shape)}" for n, t in zip(fo, parts))
                raise ValueError(f"shape mismatch: {fm!r} is built from parts of different shapes: {shapes}")
            out[fm] = torch.cat(parts, dim=0)  # 3 x (D, D) -> (3D, D)
        else:
            out[fm] = sd[fo]
    return out


# ---------------------------------------------------------------------------------------------------
# Official MAE and timm: the same names as fastmae.

def mae_encoder(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The encoder part of a full MAE state dict (what official mae_pretrain_vit_*.pth holds)."""
    return {k: v for k, v in sd.items() if not k.startswith(DECODER_PREFIXES)}


def timm_to_fastmae(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A timm VisionTransformer state dict as fastmae's: the same names; refuses timm-only parts.

    timm with global_pool='avg' has fc_norm and no norm, with 'token' norm and no fc_norm, as fastmae.
    """
    sd = unwrap(sd)
    extra = [k for k in sd if any(t in "." + k for t in TIMM_ONLY)]
    if extra:
        raise ValueError(f"timm-only parameters that fastmae's ViT does not have: {_names(extra)}")
    if "norm.weight" in sd and "fc_norm.weight" in sd:
        raise ValueError("both 'norm' and 'fc_norm' are present; fastmae uses one (token: norm, avg: fc_norm)")
    if "pos_embed" in sd and "cls_token" not in sd:
        raise ValueError("no 'cls_token': timm models without a class token are not supported")
    return dict(sd)


def fastmae_to_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A fastmae ViT/encoder state dict for timm's VisionTransformer (an MAE keeps only its encoder).

    Load with timm.create_model(..., global_pool='avg' if 'fc_norm.weight' in sd else 'token').
    """
    return timm_to_fastmae(mae_encoder(sd))


# ---------------------------------------------------------------------------------------------------
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
    return [pair for i in range(n) for pair in _expand(rows, i=i, v=v)]


def hf_key_map(kind: Kind, depth: int, decoder_depth: int = 0, style: str = "legacy",
               prefix: str = "vit.", head: bool = True) -> list[tuple[str, Any]]:
    """All (fastmae, Hugging Face) key pairs of one model; style 'legacy' or 'modular'."""
    if style not in ("legacy", "modular"):
        raise ValueError(f"Hugging Face layout must be 'legacy' or 'modular', got {style!r}")
    pairs = _expand(HF_EMBED, v=prefix) + _blocks(HF_ENCODER_BLOCKS, style, depth, prefix)
    pairs += _expand(HF_ENCODER_NORM, v=prefix)
    if kind == "mae":
        pairs += _expand(HF_DECODER_IN) + _blocks(HF_DECODER_BLOCKS, style, decoder_depth, prefix)
        pairs += _expand(HF_DECODER_OUT)
    if kind == "vit" and head:
        pairs += _expand(HF_HEAD)
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


def _cfg_dict(hf_config) -> dict:
    """A transformers config object or a parsed config.json, as a dict."""
    if hf_config is None:
        return {}
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


def _check_hf_config(cfg: Mapping[str, Any]) -> None:
    """Refuse settings fastmae's blocks cannot reproduce; warn on LayerNorm eps (fastmae uses 1e-6)."""
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported: fastmae blocks use exact GELU")
    if not cfg.get("qkv_bias", True):
        raise ValueError("qkv_bias=False is not supported: fastmae's attention has a qkv bias")
    eps = cfg.get("layer_norm_eps", LN_EPS)
    if eps != LN_EPS:
        warnings.warn(f"the Hugging Face config has layer_norm_eps={eps}; fastmae uses {LN_EPS} (the official "
                      f"MAE value), so outputs differ very slightly", stacklevel=3)


def _hf_image_kwargs(cfg: Mapping[str, Any]) -> dict:
    """img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio of an HF ViT/ViTMAE config."""
    img, patch = cfg["image_size"], cfg["patch_size"]
    if isinstance(patch, (list, tuple)):
        if patch[0] != patch[1]:
            raise ValueError(f"non-square patches {patch} are not supported")
        patch = patch[0]
    if isinstance(img, (list, tuple)):
        img = int(img[0]) if img[0] == img[1] else (int(img[0]), int(img[1]))
    D = cfg["hidden_size"]
    return dict(img_size=img, patch_size=int(patch), in_chans=cfg.get("num_channels", 3), embed_dim=D,
                depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                mlp_ratio=cfg["intermediate_size"] / D)


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
    cfg = _cfg_dict(hf_config)
    enc = HF_ENCODER_BLOCKS[1 if style == "legacy" else 2].replace("{v}", "vit.")
    depth = cfg.get("num_hidden_layers") or _num_blocks(sd, enc)
    dec_depth = cfg.get("decoder_num_hidden_layers", _num_blocks(sd, HF_DECODER_BLOCKS[1]))
    pairs = hf_key_map("mae", depth, dec_depth, style)
    _fill_fixed_pos_embeds(sd, pairs, cfg)
    out = _from_foreign(sd, pairs, "Hugging Face ViTMAEForPreTraining", {"decoder.": DECODER_HINT})
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
        sd[hf_name] = sincos_2d(*grid, sd[width_name].shape[-1], cls_token=True).unsqueeze(0)  # (1, 1+L, D)


def fastmae_to_hf_mae(sd: Mapping[str, torch.Tensor], mae_kwargs: Mapping[str, Any], mask_ratio: float = 0.75,
                      style: HFStyle = "auto") -> tuple[StateDict, Any]:
    """A fastmae/official MAE state dict -> (ViTMAEForPreTraining state dict, transformers.ViTMAEConfig).

    style 'auto' = the installed transformers' in-memory layout (load with model.load_state_dict);
    'legacy' = the Hub-file layout that from_pretrained of every version reads (what save_hf should get).
    """
    kw = dict(mae_kwargs)
    check_state_dict(sd, "mae", kw)
    style = installed_hf_style() if style == "auto" else style
    hf_sd = _to_foreign(sd, hf_key_map("mae", kw["depth"], kw["decoder_depth"], style))
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
    """Config fields shared by ViTConfig and ViTMAEConfig, with fastmae's LayerNorm eps and exact GELU."""
    img = kw.get("img_size", 224)
    img = img if isinstance(img, int) else (int(img[0]) if img[0] == img[1] else [int(img[0]), int(img[1])])
    return dict(image_size=img, patch_size=kw["patch_size"], num_channels=kw.get("in_chans", 3),
                hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
                hidden_act="gelu", layer_norm_eps=LN_EPS, qkv_bias=True,
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
    cfg = _cfg_dict(hf_config)
    enc = HF_ENCODER_BLOCKS[1 if style == "legacy" else 2].replace("{v}", v)
    depth = cfg.get("num_hidden_layers") or _num_blocks(sd, enc)
    head = "classifier.weight" in sd
    pairs = hf_key_map("vit", depth, style=style, prefix=v, head=head)
    if fmt == "hf-vitmae-model":  # fixed sin-cos; ViT's own position embeddings are learned
        _fill_fixed_pos_embeds(sd, pairs, cfg)
    out = _from_foreign(sd, pairs, f"Hugging Face {fmt}")
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
        hf_sd = _to_foreign(sd, hf_key_map("vit", kw["depth"], style=style, prefix="vit."))
        n = kw["num_classes"]
        config = tf.ViTConfig(**common, num_labels=n, architectures=["ViTForImageClassification"])
    else:
        hf_sd = _to_foreign(sd, hf_key_map("encoder", kw["depth"], style=style, prefix=""))
        config = tf.ViTMAEConfig(**common, mask_ratio=mask_ratio, architectures=["ViTMAEModel"])
    return hf_sd, config


# ---------------------------------------------------------------------------------------------------
# Files.

def _load_weights(path: Path) -> StateDict:
    """One weights file: .safetensors via safetensors, anything else via torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap(load_file(str(path), device="cpu"))
    return unwrap(torch_load(path))


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _load_hf_dir(path: Path) -> tuple[StateDict, dict]:
    """A Hugging Face model folder: its weights (single or sharded) and parsed config.json."""
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is a folder without config.json; expected a Hugging Face model folder")
    config = json.loads((path / "config.json").read_text())
    for name in HF_WEIGHT_FILES:
        f = path / name
        if f.exists():
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
                sd: StateDict = {}
                for shard in shards:  # names from a downloaded file: never outside the folder
                    sd.update(_load_weights(safe_join(path, shard, what=f"shard named in {f}")))
                return sd, config
            return _load_weights(f), config
    raise FileNotFoundError(f"{path} has config.json but no weights ({', '.join(HF_WEIGHT_FILES)})")


def load_state_dict_file(path: str | Path) -> StateDict:
    """The flat state dict in a .safetensors/.pth/.pt/.bin file or a Hugging Face model folder."""
    return load_with_config(path)[0]


def load_with_config(path: str | Path) -> tuple[StateDict, dict]:
    """(state dict, config): config.json of a Hugging Face folder, the .json beside a fastmae file, or {}."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        return _load_hf_dir(p)
    sd = _load_weights(p)
    side = p.with_suffix(".json")
    meta = {}
    if side.exists():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError:
            meta = {}
    return sd, meta if isinstance(meta, dict) else {}


def _save_safetensors(path: Path, sd: Mapping[str, torch.Tensor]) -> Path:
    """safetensors file, atomically; metadata format=pt as transformers' from_pretrained requires."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _save_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_fastmae(path_without_ext: str | Path, sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
                 ) -> Path:
    """Write X.safetensors and X.json (meta with 'kind' and 'model_kwargs'); returns the .safetensors path."""
    if meta.get("kind") not in ("mae", "vit", "encoder") or not isinstance(meta.get("model_kwargs"), Mapping):
        raise ValueError("meta needs 'kind' ('mae', 'vit' or 'encoder') and 'model_kwargs' (a dict)")
    base = Path(path_without_ext)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    out = _save_safetensors(base.with_name(base.name + ".safetensors"), sd)
    _save_text(base.with_name(base.name + ".json"), json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")
    return out


def save_hf(directory: str | Path, hf_sd: Mapping[str, torch.Tensor], hf_config,
            preprocessor: Mapping[str, Any] | None = None) -> Path:
    """A Hugging Face model folder: config.json + model.safetensors (keys written as given: pass
    style='legacy' state dicts so that every transformers version loads them), and
    preprocessor_config.json when `preprocessor` is given (see hf_preprocessor_config)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{d} exists and is not a folder; a Hugging Face model is a folder")
    _save_safetensors(d / "model.safetensors", hf_sd)
    _save_text(d / "config.json", json.dumps(_cfg_dict(hf_config), indent=2, sort_keys=True) + "\n")
    if preprocessor:
        _save_text(d / HF_PREPROCESSOR, json.dumps(dict(preprocessor), indent=2, sort_keys=True) + "\n")
    return d


HF_PREPROCESSOR = "preprocessor_config.json"


def hf_preprocessor_config(img_size, mean, std) -> dict:
    """A ViTImageProcessor config with the model's data normalisation (bicubic resize to img_size)."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": H, "width": W},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(m) for m in mean], "image_std": [float(s) for s in std]}


def save_timm(path: str | Path, sd: Mapping[str, torch.Tensor]) -> Path:
    """Weights only: a .safetensors file, or a .pth/.pt/.bin state dict (torch.save)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return _save_safetensors(p, sd)
    if p.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"timm output must end in .safetensors, .pth, .pt or .bin, got {p.name}")
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    return atomic_write(p, lambda tmp: torch.save(tensors, tmp))


def save_official(path: str | Path, sd: Mapping[str, torch.Tensor]) -> Path:
    """An official-style checkpoint: {'model': state_dict} in a .pth (loads with weights_only=True)."""
    p = Path(path)
    if p.suffix not in (".pth", ".pt"):
        raise ValueError(f"official output must end in .pth or .pt, got {p.name}")
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    return atomic_write(p, lambda tmp: torch.save({"model": tensors}, tmp))


# ---------------------------------------------------------------------------------------------------
# The command.

def to_fastmae(sd: StateDict, config: Mapping[str, Any], num_heads: int = 0, decoder_num_heads: int = 0,
               img_size=None) -> tuple[Kind, StateDict, dict, dict]:
    """Any supported state dict -> (kind, fastmae state dict, model kwargs, extra meta).

    config: HF config.json or fastmae sidecar metadata ({} if none). Heads: explicit > config > table.
    """
    fmt = detect_format(sd)
    extra: dict[str, Any] = {"source_format": fmt}
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
    if not kw:
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


def convert(src: str | Path, dst: str | Path, to: Target = "fastmae", num_heads: int = 0,
            decoder_num_heads: int = 0, img_size: tuple[int, int] | None = None) -> Path:
    """Read `src` (any supported format), convert, and write `dst` in format `to`; returns what was written."""
    sd, config = load_with_config(src)
    kind, sd, kw, extra = to_fastmae(sd, config, num_heads, decoder_num_heads, img_size)
    if to == "fastmae":
        meta = {"kind": kind, "model_kwargs": kw, "source": str(src), **extra}
        return save_fastmae(dst, sd, meta)
    if to == "official":
        return save_official(dst, sd)
    if to == "timm":
        return save_timm(dst, fastmae_to_timm(sd))
    if to == "hf":
        mask_ratio = float(extra.get("mask_ratio", 0.75))
        if kind == "mae":
            hf_sd, hf_config = fastmae_to_hf_mae(sd, kw, mask_ratio, style="legacy")
        else:
            hf_sd, hf_config = fastmae_to_hf_vit(sd, kw, style="legacy", mask_ratio=mask_ratio)
        pre = (hf_preprocessor_config(kw.get("img_size", 224), extra["mean"], extra["std"])
               if "mean" in extra and "std" in extra else None)
        return save_hf(dst, hf_sd, hf_config, pre)
    raise ValueError(f"unknown target format {to!r}; choose fastmae, hf, timm or official")


def convert_from_config(cfg: ConvertConfig) -> Path:
    """convert() with the fields of a ConvertConfig (what `fastmae convert` runs)."""
    validate(cfg)
    img = cfg.img_size if tuple(cfg.img_size) != (0, 0) else None
    return convert(cfg.src, cfg.dst, cfg.to, cfg.num_heads, cfg.decoder_num_heads, img)
