"""Recognise a state dict: unwrap checkpoint wrappers, tell its format by its keys, infer the fastmae
constructor kwargs (heads from the standard widths), and check names and shapes against the fastmae model."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch

from ...models.mae import DECODER_PAPER, DECODER_SMALL
from ...models.vit import ENCODER_SIZES
from ..checkpoint import check_state_dict as check_keys
from ..checkpoint import key_list

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


def unwrap_state_dict(obj: Any) -> StateDict:
    """The flat state dict inside a checkpoint: takes {'model': sd} (official), 'state_dict', and
    strips DDP's `module.` / torch.compile's `_orig_mod.` prefixes."""
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"no state dict found in the checkpoint: its top-level keys are {key_list(list(obj))}; "
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
        f"'...embeddings.patch_embeddings.projection.weight'); first keys: {key_list(keys)}"
    )


def kind_of(fmt: Format) -> Kind:
    """The fastmae model a format converts to."""
    return {"fastmae-mae": "mae", "hf-vitmae-pretraining": "mae", "fastmae-encoder": "encoder",
            "hf-vitmae-model": "encoder"}.get(fmt, "vit")  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# Constructor kwargs from the weights.

def num_blocks(keys, prefix: str) -> int:
    """Number of blocks `prefix.{i}.` among the keys; they must be numbered 0..n-1."""
    rx = re.compile(re.escape(prefix).replace(r"\{i\}", r"(\d+)"))
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    if found and found != set(range(max(found) + 1)):
        gaps = sorted(set(range(max(found) + 1)) - found)
        raise ValueError(f"blocks {prefix.format(i=gaps[0])}... missing: indices {gaps} of 0..{max(found)}")
    return len(found)


def _grid(n_pos: int, patch: int, img_size, what: str) -> tuple[int, int]:
    """Image (H, W) for a position embedding with 1 + n_pos rows: img_size if given, else a square grid."""
    if isinstance(img_size, int):  # a side; 0 or less = not given
        img_size = (img_size, img_size) if img_size > 0 else None
    if img_size and tuple(img_size) != (0, 0):
        H, W = tuple(img_size)
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
            raise ValueError(f"cannot infer the model: key {key!r} is missing; first keys: {key_list(list(sd))}")
    for key, rank in (("patch_embed.proj.weight", 4), ("pos_embed", 3), ("blocks.0.mlp.fc1.weight", 2)):
        if key in sd and sd[key].ndim != rank:
            raise ValueError(f"{key!r} has {sd[key].ndim} dimensions {tuple(sd[key].shape)}, expected {rank}: "
                             f"not a ViT checkpoint, or a damaged one")
    D, C, p, q = sd["patch_embed.proj.weight"].shape  # (D, C, p, p)
    if p != q:
        raise ValueError(f"non-square patches {p}x{q} are not supported")
    depth = num_blocks(sd, "blocks.{i}.")
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
        raise ValueError(f"not a full MAE state dict: missing {key_list(missing)}. {DECODER_HINT}")
    kw = infer_vit_kwargs(sd, img_size, num_heads)
    for k in ("num_classes", "global_pool"):
        kw.pop(k)
    Dd = sd["decoder_embed.weight"].shape[0]  # (Dd, D)
    kw.update(
        decoder_embed_dim=Dd, decoder_depth=num_blocks(sd, "decoder_blocks.{i}."),
        decoder_num_heads=decoder_num_heads or default_num_heads(Dd, DECODER_HEADS),
    )
    if kw["decoder_depth"] and sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / Dd != kw["mlp_ratio"]:
        raise ValueError("the decoder's MLP ratio differs from the encoder's; fastmae uses one mlp_ratio for both")
    if "decoder_blocks.0.attn.kv.weight" in sd:  # CrossMAE's decoder (its share of decoded patches is not in them)
        kw["decoder"] = "cross"
    return kw


# ---------------------------------------------------------------------------------------------------
# Checks against the fastmae model.

DECODER_HINT = (
    "An encoder-only checkpoint (official mae_pretrain_vit_*.pth, a fastmae 'encoder') has no decoder; "
    "the official *_full.pth / mae_visualize_vit_*.pth checkpoints and fastmae pretraining checkpoints have it."
)
HEAD_HINT = "A pre-trained encoder has no classifier head; fine-tune it first (fastmae finetune)."


def expected_shapes(kind: Kind, model_kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the fastmae model for `kind`, built without allocating its weights."""
    from ...models.mae import MaskedAutoencoderViT
    from ...models.vit import VisionTransformer

    with torch.device("meta"):  # shapes only: a crafted size allocates nothing
        model = MaskedAutoencoderViT(**model_kwargs) if kind == "mae" else VisionTransformer(**model_kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_kwargs_against_weights(sd: Mapping[str, torch.Tensor], kind: Kind, kw: Mapping[str, Any],
                                 where: str = "the metadata") -> None:
    """Sizes recorded beside the weights (a .json, a config) must be the weights' own: compared before any model is
    built, so a crafted `embed_dim: 120000` or `depth: 3000000` is refused instead of allocated."""
    try:
        img, heads = kw.get("img_size"), 1  # heads are not in the weights, so not compared: any count does here
        own = (infer_mae_kwargs(sd, img, heads, heads) if kind == "mae" else infer_vit_kwargs(sd, img, heads))
    except ValueError as e:
        raise ValueError(f"{where} does not fit the weights: {e}") from None
    keys = ("patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio") + (
        ("decoder_embed_dim", "decoder_depth") if kind == "mae" else ())
    bad = [f"{k}={kw[k]!r} (the weights: {own[k]!r})" for k in keys if k in kw and kw[k] != own[k]]
    if bad:
        raise ValueError(f"{where} does not belong to these weights: " + ", ".join(bad)
                         + "; fix or delete the metadata (sizes are then read from the weights)")


def check_state_dict(
    sd: Mapping[str, torch.Tensor], kind: Kind, model_kwargs: Mapping[str, Any],
    source_names: Mapping[str, str] | None = None,
) -> None:
    """checkpoint.check_state_dict against the fastmae model of `kind` built from model_kwargs (on the meta
    device), with the hint that fits what is missing (a decoder, a head)."""
    def advice(missing: list[str]) -> str:
        hint = DECODER_HINT if any(k.startswith(DECODER_PREFIXES) for k in missing) else ""
        return (hint + " " + HEAD_HINT if "head.weight" in missing else hint).strip()

    kw = ", ".join(f"{k}={v}" for k, v in model_kwargs.items())
    check_keys(sd, expected_shapes(kind, model_kwargs), f"the fastmae {kind} ({kw})", source_names, advice)
