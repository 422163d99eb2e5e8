"""Figures as image grids: a titled grid of PIL images, tensors to enlarged PIL images (pixels kept sharp)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..weights.checkpoint import atomic_write


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
    """A PNG of cells under column titles, one row per sample: each column as wide as its widest cell, each row as
    high as its tallest (images of several sizes neither overlap nor get cut); written atomically."""
    pad, head = 4, 18
    widths = [max(cells[j].size[0] for cells in rows if j < len(cells)) for j in range(len(titles))]
    heights = [max(cell.size[1] for cell in cells) for cells in rows]
    lefts = [pad + sum(w + pad for w in widths[:j]) for j in range(len(titles))]
    tops = [head + sum(h + pad for h in heights[:i]) for i in range(len(rows))]
    grid = Image.new("RGB", (lefts[-1] + widths[-1] + pad, tops[-1] + heights[-1] + 2 * pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(titles):
        draw.text((lefts[j], 3), title, fill="black")
    for i, cells in enumerate(rows):
        for j, cell in enumerate(cells):
            grid.paste(cell, (lefts[j], tops[i]))
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
