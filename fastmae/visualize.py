"""The MAE demo picture: original / masked / reconstruction / reconstruction + visible.

Shapes: B batch, C channels, H, W image, p patch, L patches. Images come in normalised as the
model saw them and go out in [0, 1] pixel space (denormalised with the data's mean/std).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .mae import MaskedAutoencoderViT
from .patches import patchify

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
    """Run the MAE and return the four panels, each (B, C, H, W) in [0, 1], plus 'mask' (B, L).

    With norm_pix_loss the predictions are per-patch normalised; they are mapped back with each
    patch's own mean and variance (from the input), so colours and contrast are right.
    """
    was_training = model.training
    model.eval()
    B = imgs.shape[0]
    if noise is None and seed is not None:
        noise = seeded_noise(B, model.patch_embed.num_patches, seed, imgs.device)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # (B, L, p*p*C), (B, L)
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
    }


def _to_pil(img: torch.Tensor, scale: int) -> Image.Image:
    """(C, H, W) in [0, 1] -> a PIL image; 1 channel as grey, 3+ channels show the first three as RGB."""
    arr = (img[:3] if img.shape[0] >= 3 else img[:1]).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr[..., 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr, mode="RGB")
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil.convert("RGB")


def save_figure(panels: dict[str, torch.Tensor], path: str | Path, max_rows: int = 8, min_side: int = 112) -> Path:
    """A grid PNG: one row per image, columns original / masked / reconstruction / reconstruction + visible."""
    path = Path(path)
    n = min(panels["original"].shape[0], max_rows)
    H, W = panels["original"].shape[-2:]
    scale = max(1, -(-min_side // min(H, W)))  # small images (28 px) are enlarged with nearest neighbour
    cw, ch, pad, head = W * scale, H * scale, 4, 18
    grid = Image.new("RGB", (len(PANELS) * (cw + pad) + pad, head + n * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(PANELS):
        draw.text((pad + j * (cw + pad), 3), name, fill="black")
        for i in range(n):
            grid.paste(_to_pil(panels[name][i], scale), (pad + j * (cw + pad), head + i * (ch + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(path)
    return path
