"""The segmentation figure: image / ground truth / prediction per row, label maps in a fixed palette."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..data.segmentation import palette
from .grid import enlargement, save_grid, to_pil


def save_seg_figure(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path, mean: tuple, std: tuple,
                    ignore_index: int, min_side: int = 168) -> Path:
    """image / ground truth / prediction, one row per (image (C, H, W) normalised, label (H, W), prediction (H, W))."""
    colours = palette(ignore_index)  # (256, 3)
    H, W = rows[0][1].shape
    scale = enlargement(H, W, min_side)
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def label_pil(y: torch.Tensor) -> Image.Image:
        return Image.fromarray(colours[y.long().clamp(0, 255)].numpy(), "RGB").resize((W * scale, H * scale),
                                                                                      Image.NEAREST)

    cells = [[to_pil((img * std_t + mean_t).clamp(0, 1), scale), label_pil(y), label_pil(pred)]
             for img, y, pred in rows]
    return save_grid(("image", "ground truth", "prediction"), cells, path)
