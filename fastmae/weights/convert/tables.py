"""Renaming tables: (fastmae, foreign) name pairs expanded per block; the official/timm names are fastmae's own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import key_list
from .formats import (
    DECODER_PREFIXES,
    TIMM_ONLY,
    StateDict,
    Table,
    unwrap_state_dict,
)

# Table machinery.

def expand_table(table: Table, **fields) -> list[tuple[str, Any]]:
    """Fill {i}/{v} in a table and expand {p} into weight and bias rows."""
    out = []
    for fm, fo in table:
        for p in ("weight", "bias") if "{p}" in fm else (None,):
            fill = lambda s: s.format(p=p, **fields)  # noqa: E731
            out.append((fill(fm), tuple(map(fill, fo)) if isinstance(fo, tuple) else fill(fo)))
    return out


def to_foreign(sd: Mapping[str, torch.Tensor], pairs: list[tuple[str, Any]]) -> StateDict:
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


def from_foreign(sd: Mapping[str, torch.Tensor], pairs: list[tuple[str, Any]], what: str,
                  hints: Mapping[str, str] | None = None) -> StateDict:
    """Rename foreign -> fastmae (tuple sources concatenated on dim 0); every key must be used exactly.

    hints: {substring: advice} added to the error when a missing key contains the substring.
    """
    wanted = [n for _, fo in pairs for n in (fo if isinstance(fo, tuple) else (fo,))]
    missing = [n for n in wanted if n not in sd]
    unexpected = sorted(set(sd) - set(wanted))
    if missing or unexpected:
        parts = [f"missing keys {key_list(missing)}" if missing else "",
                 f"unexpected keys {key_list(unexpected)}" if unexpected else ""]
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
    sd = unwrap_state_dict(sd)
    extra = [k for k in sd if any(t in "." + k for t in TIMM_ONLY)]
    if extra:
        raise ValueError(f"timm-only parameters that fastmae's ViT does not have: {key_list(extra)}")
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
