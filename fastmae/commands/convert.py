"""`fastmae convert`: read a checkpoint in any supported format (or a run folder) and write it in another.

The formats and their renaming tables are `fastmae.weights.convert`; this module reads, converts and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from ..config import NON_NEGATIVE, Rule, image_size, validate
from ..weights import convert as formats
from ..weights.read import PoseWeights, find_source, read_pose

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae convert --help`).

@dataclass(frozen=True)
class ReadModelConfig:
    """What a checkpoint may not record: attention heads (not in the weights) and the pixel target."""

    RULES: ClassVar[dict[str, Rule]] = {"num_heads": NON_NEGATIVE, "decoder_num_heads": NON_NEGATIVE, "img_size": image_size(zero_ok=True)}

    num_heads: int = 0
    """Encoder heads (0 = from the checkpoint's config/metadata, else the standard width table)."""
    decoder_num_heads: int = 0
    """Decoder heads (0 = from the checkpoint's config/metadata, else the standard width table)."""
    img_size: tuple[int, int] = (0, 0)
    """Image height and width (0, 0 = square, from the position embedding); needed for non-square grids."""


@dataclass(frozen=True)
class ConvertConfig:
    """Convert a checkpoint between fastmae, the official MAE release, Hugging Face and timm.

    fastmae convert --init mae_visualize_vit_base.pth --output vit-mae-base --to hf

    fastmae convert --init vit-mae-base --output mae_base --to fastmae   (writes mae_base.safetensors + .json)
    """

    init: str
    """Input: a .pth/.pt/.bin/.safetensors file (official, fastmae, timm or HF weights), a Hugging Face model
    folder (config.json + model.safetensors or pytorch_model.bin), or a fastmae run folder."""
    output: str
    """Output. fastmae: a path without extension (X.safetensors + X.json); hf: a folder; timm: a .safetensors
    or .pth file; official: a .pth file holding {'model': state_dict}."""
    to: Literal["fastmae", "hf", "timm", "official"] = "fastmae"
    """Target format. hf: MAE -> ViTMAEForPreTraining, encoder -> ViTMAEModel, cls-token classifier ->
    ViTForImageClassification, `fastmae pose` run -> VitPoseForPoseEstimation. timm/official keep the official
    names (timm drops an MAE's decoder); a pose or other dense-task run converts to its encoder."""
    model: ReadModelConfig = field(default_factory=ReadModelConfig)


def convert(src: str | Path, dst: str | Path, to: formats.Target = "fastmae", num_heads: int = 0,
            decoder_num_heads: int = 0, img_size: tuple[int, int] | None = None) -> Path:
    """Read `src` (any supported format, a run folder: its newest checkpoint), convert, and write `dst` in format
    `to`; returns what was written. Existing files are never replaced: an output that exists is refused first."""
    taken = [p for p in output_files(dst, to) if p.exists()]
    if taken:
        raise ValueError(f"{taken[0]} exists; fastmae convert does not overwrite files: pass another --output or "
                         f"remove it first")
    src = find_source(Path(src).expanduser())
    pose = read_pose(src) if to in ("hf", "fastmae") else None  # a whole pose model stays whole
    if pose is None:
        sd, config = formats.read_file(src)
        kind, sd, kw, extra = formats.to_fastmae(sd, config, num_heads, decoder_num_heads, img_size)
    try:
        if pose is not None and to == "fastmae":
            meta = {"kind": "pose", "model_kwargs": pose.kwargs, "source": str(src), "mean": list(pose.mean),
                    "std": list(pose.std)}
            return formats.save_fastmae(dst, pose.state_dict, meta)
        if pose is not None:
            return _write_vitpose(dst, pose)
        return _write(dst, to, src, kind, sd, kw, extra)
    except BaseException:  # a full disk, a signal: no half set of files (e.g. weights without config.json) stays
        for path in output_files(dst, to):  # none of them existed before (refused above)
            path.unlink(missing_ok=True)
        raise


def _write(dst: str | Path, to: formats.Target, src: Path, kind: str, sd: dict, kw: dict, extra: dict) -> Path:
    """Write the converted state dict in format `to`."""
    if to == "fastmae":
        meta = {"kind": kind, "model_kwargs": kw, "source": str(src), **extra}
        return formats.save_fastmae(dst, sd, meta)
    if to == "official":
        return formats.save_official(dst, sd)
    if to == "timm":
        return formats.save_timm(dst, formats.fastmae_to_timm(sd))
    if to == "hf":
        mask_ratio = float(extra.get("mask_ratio", 0.75))
        if kind == "mae":
            hf_sd, hf_config = formats.fastmae_to_hf_mae(sd, kw, mask_ratio, style="legacy")
        else:
            hf_sd, hf_config = formats.fastmae_to_hf_vit(sd, kw, style="legacy", mask_ratio=mask_ratio)
        pre = (formats.hf_preprocessor_config(kw.get("img_size", 224), extra["mean"], extra["std"])
               if "mean" in extra and "std" in extra else None)
        return formats.save_hf(dst, hf_sd, hf_config, pre)
    raise ValueError(f"unknown target format {to!r}; choose fastmae, hf, timm or official")


def _write_vitpose(dst: str | Path, pose: PoseWeights) -> Path:
    """A pose model as a Hugging Face VitPoseForPoseEstimation folder (with a VitPoseImageProcessor config)."""
    hf_sd, hf_config = formats.fastmae_to_hf_vitpose(pose.state_dict, pose.kwargs)
    H, W = (int(v) for v in pose.kwargs["encoder"]["img_size"])
    pre = {"image_processor_type": "VitPoseImageProcessor", "do_affine_transform": True,
           "size": {"height": H, "width": W}, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": list(pose.mean), "image_std": list(pose.std), "normalize_factor": 200.0}
    return formats.save_hf(dst, hf_sd, hf_config, pre)


def output_files(dst: str | Path, to: formats.Target) -> list[Path]:
    """The files `convert(..., dst, to)` writes."""
    d = Path(dst)
    if to == "fastmae":
        base = d.with_suffix("") if d.suffix in (".safetensors", ".json") else d
        return [base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")]
    if to == "hf":
        return [d / "model.safetensors", d / "config.json", d / formats.HF_PREPROCESSOR]
    return [d]


def convert_from_config(cfg: ConvertConfig) -> Path:
    """convert() with the fields of a ConvertConfig (what `fastmae convert` runs)."""
    validate(cfg)
    img = cfg.model.img_size if tuple(cfg.model.img_size) != (0, 0) else None
    out = convert(cfg.init, cfg.output, cfg.to, cfg.model.num_heads, cfg.model.decoder_num_heads, img)
    written = [p for p in output_files(cfg.output, cfg.to) if p.exists()]
    print(f"converted {cfg.init} to {cfg.to}: {', '.join(map(str, written)) or out}")
    return out
