"""Reading a COCO annotations JSON (instances or keypoints) with one-line errors naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

from .decode import UnreadableImageError, exif_frame_note, image_header, oriented_hw


def fail(path: Path, problem: str, fix: str = "") -> ValueError:
    """The error for a bad annotations file: '<path>: <problem>; <fix>'."""
    return ValueError(f"{path}: {problem}" + (f"; {fix}" if fix else ""))


def read_coco_json(path: Path, kind: str = "instances", example: str = "instances_train2017.json") -> dict:
    """The parsed file, checked to hold COCO's three lists. kind, example: what the command expects, for errors."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"annotations file {path} does not exist; pass the COCO {kind} JSON of the "
                                f"images") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(path, f"not a readable JSON file ({e})", f"pass a COCO {kind} JSON") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                     "categories")):
        keys = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise fail(path, f"not COCO {kind} annotations (needs lists 'images', 'annotations', 'categories'; "
                         f"found {keys})", f"pass a COCO {kind} JSON (e.g. {example})")
    return data


def entry_hw(entry: dict) -> tuple[int, int] | None:
    """(height, width) an 'images' entry states, or None when it states none (both must be positive numbers)."""
    try:
        h, w = int(entry["height"]), int(entry["width"])
    except (KeyError, TypeError, ValueError):
        return None
    return (h, w) if h > 0 and w > 0 else None


def coco_image_size(file: Path, img_id: int, stated_hw: tuple[int, int] | None, path: Path,
                    max_image_pixels: int = 0, upright: bool = True) -> tuple[tuple[int, int], int]:
    """(h, w) of an 'images' entry's file as it will be decoded, and its EXIF orientation, from the header alone
    (nothing decoded: a split of any size costs no memory). The size must be the entry's width and height where
    it states them: annotations in another frame would be silently misplaced (detectron2 checks the same)."""
    try:
        stored, orientation = image_header(file, max_image_pixels)
    except UnreadableImageError as e:
        raise e.without_skip_hint() from None
    hw = oriented_hw(stored, orientation, upright)
    if stated_hw is not None and hw != stated_hw:
        raise fail(path, f"image {file} (id {img_id}) is {hw[1]}x{hw[0]} (WxH), but its entry says "
                         f"{stated_hw[1]}x{stated_hw[0]}", "fix the entry's width and height, or the image"
                         + exif_frame_note(stored, orientation, upright))
    return hw, orientation
