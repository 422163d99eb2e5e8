"""Predictions drawn on their image, one picture per image (`fastmae predict`'s vis/): boxes with class names and
scores, skeletons, mask overlays, the top class. Images come as (C, h, w) uint8 (1 or 3 channels); records are in
the image's own pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.segmentation import palette
from ..models.boxes import batched_nms

BOX = (230, 40, 40)
POINT = (40, 200, 230)
DRAWN_IOU = 0.6  # a drawn box hides the lower-scoring ones of any class overlapping it above this IoU


def to_rgb(img: torch.Tensor) -> Image.Image:
    """(C, h, w) uint8 -> an RGB PIL image (grey repeated; the first three bands of more)."""
    x = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")


def place_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, taken: list, colour) -> None:
    """Text at xy, moved down past labels already at that place (two objects at one place stay readable)."""
    x, y = xy
    while any(abs(x - tx) < 40 and abs(y - ty) < 11 for tx, ty in taken):
        y += 11
    taken.append((x, y))
    draw.text((x, y), text, fill=colour)


def drawn_detections(records: Sequence[dict], min_score: float) -> list[dict]:
    """The detections a drawing shows: those scoring at least min_score, best first, each object once (a box hides
    lower-scoring ones of any class overlapping it above DRAWN_IOU). The records themselves keep every class's
    guess, which box AP counts; a picture with two labels on one object helps no one."""
    shown = [r for r in records if r["score"] >= min_score]
    if not shown:
        return []
    xywh = torch.tensor([r["bbox"] for r in shown], dtype=torch.float64)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    keep = batched_nms(boxes, torch.tensor([float(r["score"]) for r in shown]), DRAWN_IOU)
    return [shown[i] for i in keep.tolist()]


def draw_detections(img: torch.Tensor, records: Sequence[dict], min_score: float) -> Image.Image:
    """Boxes scoring at least min_score with 'class score', each object once (`drawn_detections`)."""
    pil = to_rgb(img)
    draw, taken = ImageDraw.Draw(pil), []
    for r in drawn_detections(records, min_score):
        x, y, w, h = r["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=BOX, width=2)
        place_label(draw, (x + 2, y + 1), f"{r.get('class_name', r['category_id'])} {r['score']:.2f}", taken, BOX)
    return pil


def draw_pose(img: torch.Tensor, records: Sequence[dict], skeleton: Sequence[tuple[int, int]],
              min_score: float) -> Image.Image:
    """Each instance's box, skeleton and keypoints (those scoring at least min_score)."""
    pil = to_rgb(img)
    draw = ImageDraw.Draw(pil)
    r_pt = max(2, round(max(pil.size) / 160))
    for r in records:
        x, y, w, h = r["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=BOX, width=1)
        k = r["keypoints"]
        pts = [(k[3 * j], k[3 * j + 1]) if k[3 * j + 2] >= min_score else None for j in range(len(k) // 3)]
        for a, b in skeleton:
            if pts[a] and pts[b]:
                draw.line([pts[a], pts[b]], fill=POINT, width=2)
        for p in pts:
            if p:
                draw.ellipse([p[0] - r_pt, p[1] - r_pt, p[0] + r_pt, p[1] + r_pt], fill=BOX)
    return pil


def draw_mask(img: torch.Tensor, mask: np.ndarray, ignore_index: int = 255, alpha: float = 0.5) -> Image.Image:
    """The label map (h, w) in the class colours of `palette`, blended over the image (background shows
    through its black at alpha)."""
    colours = palette(ignore_index)[torch.from_numpy(mask.astype(np.int64))]  # (h, w, 3)
    base = to_rgb(img)
    return Image.blend(base, Image.fromarray(colours.numpy(), "RGB"), alpha)


def draw_label(img: torch.Tensor, record: dict) -> Image.Image:
    """The top class and its probability in the top left corner."""
    pil = to_rgb(img)
    scale = max(1, 96 // max(1, min(pil.size)))
    if scale > 1:  # a tiny image (28 x 28) is enlarged so the text fits
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    ImageDraw.Draw(pil).text((2, 1), f"{record['class_name']} {record['score']:.2f}", fill=BOX)
    return pil


def mask_image(mask: np.ndarray, ignore_index: int = 255) -> Image.Image:
    """A label map (h, w) uint8 as a palette PNG: pixel value = class index (what `fastmae segment` reads), shown in
    the class colours."""
    pil = Image.fromarray(mask.astype(np.uint8), "P")
    pil.putpalette(palette(ignore_index).flatten().tolist())
    return pil


__all__ = ["place_label", "draw_detections", "draw_label", "draw_mask", "draw_pose", "mask_image", "to_rgb"]
