"""The MAE demo picture: original / masked / reconstruction / reconstruction + visible; `fastmae visualize`.

Shapes: B batch, C channels, H, W image, p patch, L patches. Images come in normalised as the
model saw them and go out in [0, 1] pixel space (denormalised with the data's mean/std).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..weights.checkpoint import atomic_write, safe_join
from ..config import DataConfig, VisualizeConfig, validate
from ..train.device import resolve_device
from ..models.mae import MaskedAutoencoderViT
from ..models.masking import check_mask_ratio
from ..models.patches import patchify
from ..train.results import refuse_replacing

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")


def seeded_noise(batch: int, num_patches: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Masking noise (B, L) from a private generator: the same seed gives the same mask, global RNG untouched."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_patches, generator=g).to(device)


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    mask_ratio: float = 0.75,
    seed: int | None = 0,
    noise: torch.Tensor | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> dict[str, torch.Tensor]:
    """Run the MAE and return the four panels, each (B, C, H, W) in [0, 1], plus 'mask' (B, L) and 'loss' ().

    imgs are normalised as the model saw them in training; mean/std map them back to pixels (pass the
    model's `data_mean` / `data_std` for a model from `fastmae.load`). seed: the mask comes from a private
    generator (the same seed gives the same mask); seed=None draws it as the official code does.

    With norm_pix_loss the predictions are per-patch normalised; they are mapped back with each
    patch's own mean and variance (from the input), so colours and contrast are right.
    """
    check_mask_ratio(mask_ratio)
    was_training = model.training
    model.eval()
    B = imgs.shape[0]
    if noise is None and seed is not None:
        noise = seeded_noise(B, model.patch_embed.num_patches, seed, imgs.device)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # (), (B, L, p*p*C), (B, L)
    pred = pred.float()
    if model.norm_pix_loss:
        target = patchify(imgs.float(), model.patch_size)  # (B, L, p*p*C)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mu
    rec = model.unpatchify(pred)  # (B, C, H, W)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).float())  # (B, C, H, W), 1 = removed
    x = imgs.float()
    model.train(was_training)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)

    def to_pixels(t: torch.Tensor) -> torch.Tensor:
        return (t * std_t + mean_t).clamp(0, 1)

    return {
        "original": to_pixels(x),
        "masked": to_pixels(x * (1 - m)),  # removed patches show the data mean, as in the official demo
        "reconstruction": to_pixels(rec),
        "reconstruction + visible": to_pixels(x * (1 - m) + rec * m),
        "mask": mask,
        "loss": loss.detach().float(),  # the training loss of this batch (MSE on the removed patches)
    }


def to_pil(img: torch.Tensor, scale: int) -> Image.Image:
    """(C, H, W) in [0, 1] -> a PIL image; 1 channel as grey, 3+ channels show the first three as RGB."""
    arr = (img[:3] if img.shape[0] >= 3 else img[:1]).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr[..., 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr, mode="RGB")
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil.convert("RGB")


def enlargement(H: int, W: int, min_side: int) -> int:
    """Integer nearest-neighbour factor that brings the shorter side to at least min_side (28 px -> 4x for 112)."""
    return max(1, -(-min_side // min(H, W)))


def save_grid(titles: Sequence[str], rows: Sequence[Sequence[Image.Image]], path: str | Path) -> Path:
    """A PNG of equal-size cells under column titles, one row per sample; written atomically (figures of
    `pretrain`, `visualize` and `segment`)."""
    cw, ch = rows[0][0].size
    pad, head = 4, 18
    grid = Image.new("RGB", (len(titles) * (cw + pad) + pad, head + len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(titles):
        draw.text((pad + j * (cw + pad), 3), title, fill="black")
    for i, cells in enumerate(rows):
        for j, cell in enumerate(cells):
            grid.paste(cell, (pad + j * (cw + pad), head + i * (ch + pad)))
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def save_figure(panels: dict[str, torch.Tensor], path: str | Path, max_rows: int = 8, min_side: int = 112) -> Path:
    """A grid PNG: one row per image, columns original / masked / reconstruction / reconstruction + visible."""
    n = min(panels["original"].shape[0], max_rows)
    scale = enlargement(*panels["original"].shape[-2:], min_side)  # small images (28 px) are enlarged
    rows = [[to_pil(panels[name][i], scale) for name in PANELS] for i in range(n)]
    return save_grid(PANELS, rows, path)


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
    from ..data import load_image

    files = image_files(paths)
    imgs = torch.stack([load_image(f, img_size, channels, mean, std, train=False, max_image_pixels=max_image_pixels)
                        for f in files])  # (B, C, H, W)
    names, seen = [], {}
    for f in files:  # a/x.png and b/x.jpg -> x, x-1
        n = seen.get(f.stem, 0)
        seen[f.stem] = n + 1
        names.append(f.stem if n == 0 else f"{f.stem}-{n}")
    return imgs, names


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
