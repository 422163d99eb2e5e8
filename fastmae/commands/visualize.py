"""The MAE demo picture: original / masked / reconstruction / reconstruction + visible; `fastmae visualize`.

Shapes: B batch, C channels, H, W image, p patch, L patches. Images come in normalised as the
model saw them and go out in [0, 1] pixel space (denormalised with the data's mean/std).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import tyro

from ..config import FRACTION, NON_NEGATIVE, POSITIVE_INT, DataConfig, Rule, validate

# the old path fastmae.visualize is this module: PANELS and save_figure stay importable from it
from ..figures.reconstruction import PANELS, reconstruct, save_figure, seeded_noise  # noqa: F401
from ..train.device import resolve_device
from ..train.results import refuse_replacing
from ..weights.checkpoint import safe_join

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae visualize --help`).

@dataclass(frozen=True)
class VisualizeModelConfig:
    """The MAE to reconstruct with, and its masking."""

    RULES: ClassVar[dict[str, Rule]] = {"num_heads": NON_NEGATIVE, "decoder_num_heads": NON_NEGATIVE, "mask_ratio": FRACTION}

    mask_ratio: float = 0.75
    num_heads: int = 0
    """Encoder heads for checkpoints that do not record them (0 = metadata, else the standard width table)."""
    decoder_num_heads: int = 0
    """Decoder heads for checkpoints that do not record them (0 = metadata, else the standard width table)."""
    norm_pix_loss: bool | None = None
    """Whether the checkpoint predicts per-patch normalised pixels (None = its metadata; official *_full.pth
    and visualize checkpoints do not record it: the official pretraining used True)."""


@dataclass(frozen=True)
class VisualizeRunConfig:
    """Where the figure is computed; the seed picks the mask (the same seed gives the same mask)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


@dataclass(frozen=True)
class VisualizeDataConfig(DataConfig):
    """Dataset samples for the figure when no --images are given: the first --num of the evaluation split, resized
    and centre-cropped (training augmentation and loader workers do not apply, so they are not flags here)."""

    crop_scale: tyro.conf.Suppress[tuple[float, float]] = (0.2, 1.0)
    hflip: tyro.conf.Suppress[bool] = False
    num_workers: tyro.conf.Suppress[int] = 0


@dataclass(frozen=True)
class VisualizeConfig:
    """Save the MAE demo figure (original / masked / reconstruction / reconstruction + visible) as PNG."""

    RULES: ClassVar[dict[str, Rule]] = {"num": POSITIVE_INT}

    init: str = "runs/pretrain"
    """MAE checkpoint (fastmae run folder or file, official *_full.pth / visualize, Hugging Face ViTMAEForPreTraining)."""
    images: tuple[str, ...] = ()
    """Image files or folders; empty = the first --num samples of the data's evaluation split."""
    data: VisualizeDataConfig = field(default_factory=VisualizeDataConfig)
    model: VisualizeModelConfig = field(default_factory=VisualizeModelConfig)
    run: VisualizeRunConfig = field(default_factory=VisualizeRunConfig)
    num: int = 8
    """Images to show when taking dataset samples."""
    output: str = "reconstruction.png"
    """Output PNG (a grid); with --per_image, a folder with one PNG per image."""
    per_image: bool = False
    overwrite: bool = False
    """Replace existing figures (otherwise an existing --output, or a per-image PNG of the same name, stops the
    command before anything is written)."""


# ---------------------------------------------------------------------------------------------------
# `fastmae visualize`: a checkpoint and some images -> the figure.

def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, or found recursively in the folders named (sorted per folder)."""
    from ..data import IMAGE_EXTENSIONS, find_images

    files: list[Path] = []
    for entry in paths:
        p = Path(entry).expanduser()
        if p.is_dir():
            found = find_images(p)
            if not found:
                raise ValueError(f"no images under {p} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"image {p} does not exist")
    if not files:
        raise ValueError("no images given")
    return files


def load_images(
    paths: Sequence[str | Path], img_size: tuple[int, int], channels: int, mean: Sequence[float],
    std: Sequence[float], max_image_pixels: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    """Files and/or folders -> (images (B, C, H, W) normalised with the eval transform, unique names).

    Files over max_image_pixels pixels (0 = Pillow's limit) are refused as possible decompression bombs.
    """
    from ..data import UnreadableImageError, load_image

    files = image_files(paths)
    try:
        imgs = torch.stack([load_image(f, img_size, channels, mean, std, train=False,
                                       max_image_pixels=max_image_pixels) for f in files])  # (B, C, H, W)
    except UnreadableImageError as e:  # --images names each file: none is skipped
        raise e.without_skip_hint() from None
    return imgs, unique_names([f.stem for f in files])


def unique_names(stems: Sequence[str]) -> list[str]:
    """One output name per input, never two alike, even ignoring case (macOS, Windows): a/x.png, b/x.jpg and
    x-1.png -> x, x-1, x-1-1."""
    names, taken = [], set()
    for stem in stems:
        name, n = stem, 0
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.casefold())
        names.append(name)
    return names


def dataset_images(data: DataConfig, num: int, img_size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """The first `num` samples of the evaluation split (the training split, untransformed, when there is
    none), with the eval transform: (images (B, C, H, W), names 'sample-0000', ...)."""
    from ..data import build_loader, has_eval_split

    if num <= 0:
        raise ValueError(f"--num must be positive, got {num}")
    # a handful of images: no worker processes, and only the first `num` files are listed
    data = dataclasses.replace(data, num_workers=0, limit=num if data.limit <= 0 else min(num, data.limit))
    split = "eval" if has_eval_split(data) else "train"
    loader = build_loader(data, split, img_size, batch_size=num, train=False)
    loader.set_epoch(0)
    imgs = next(iter(loader), (None,))[0]
    if imgs is None or len(imgs) == 0:
        raise ValueError(f"the {split} split of {data.path} holds no images")
    return imgs[:num], [f"sample-{i:04d}" for i in range(len(imgs[:num]))]


def run_visualize(cfg: VisualizeConfig) -> Path:
    """Load the MAE, reconstruct the images, write the figure; returns the PNG (or the folder with --per_image).

    Images are normalised with the checkpoint's data statistics unless --data.mean/--data.std are given.
    """
    from ..api import load, require_decoder

    validate(cfg)
    out = Path(cfg.output).expanduser()
    if not (cfg.per_image or cfg.overwrite or out.is_dir()):
        refuse_replacing([out], "--overwrite", where="--output")
    device = resolve_device(cfg.run.device)
    model = load(cfg.init, num_heads=cfg.model.num_heads, decoder_num_heads=cfg.model.decoder_num_heads,
                 norm_pix_loss=cfg.model.norm_pix_loss, map_location=device)
    model = require_decoder(model, cfg.init)
    C, img_size = model.patch_embed.in_chans, tuple(model.patch_embed.img_size)
    if cfg.data.channels and cfg.data.channels != C:
        raise ValueError(f"--data.channels {cfg.data.channels} but the model takes {C}-channel images")
    mean = tuple(cfg.data.mean) or model.data_mean
    std = tuple(cfg.data.std) or model.data_std
    if len(mean) != C or len(std) != C:
        raise ValueError(f"--data.mean/--data.std need {C} values each (one per channel), got {mean} / {std}")
    if cfg.images:
        imgs, names = load_images(cfg.images, img_size, C, mean, std, cfg.data.max_image_pixels)
    else:
        data = dataclasses.replace(cfg.data, channels=C, mean=mean, std=std)
        imgs, names = dataset_images(data, cfg.num, img_size)
    panels = reconstruct(model, imgs.to(device), cfg.model.mask_ratio, seed=cfg.run.seed, mean=mean, std=std)
    panels = {k: v.cpu() for k, v in panels.items()}
    info = f"{len(names)} images, mask ratio {cfg.model.mask_ratio}, seed {cfg.run.seed}, loss {panels['loss'].item():.4f}"
    if not cfg.per_image:
        if out.is_dir():
            raise ValueError(f"{out} is a folder; pass a .png file, or --per_image to write one PNG per image there")
        save_figure(panels, out, max_rows=len(names))
        print(f"{info}: {out}", flush=True)
        return out
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; with --per_image --output names a folder")
    if not cfg.overwrite:
        refuse_replacing([safe_join(out, f"{name}.png") for name in names], "--overwrite", where="--output")
    print(info, flush=True)
    for i, name in enumerate(names):
        one = {k: v[i : i + 1] for k, v in panels.items() if k in PANELS}
        print(save_figure(one, safe_join(out, f"{name}.png")), flush=True)
    return out
