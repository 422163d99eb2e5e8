"""Reading a COCO annotations JSON (instances or keypoints) with one-line errors naming the file and the fix."""

from __future__ import annotations

import json
import math
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


def check_images(path: Path, images: list[tuple[int, str]]) -> None:
    """ValueError naming the first image id or file listed twice: its annotations would train and be scored twice."""
    seen_ids: dict[int, str] = {}
    seen_files: dict[str, int] = {}
    for img_id, name in images:
        if img_id in seen_ids:
            raise fail(path, f"image id {img_id} is listed twice in 'images' ({seen_ids[img_id]!r} and {name!r})",
                       "list each image once, with one id")
        if name in seen_files:
            raise fail(path, f"image {name!r} is listed twice in 'images' (ids {seen_files[name]} and {img_id})",
                       "list each image once and put all its annotations on that id")
        seen_ids[img_id], seen_files[name] = name, img_id


def check_ids(path: Path, entries: list, what: str) -> None:
    """ValueError naming the first id that two entries of a list share ('annotations', 'categories'):
    pycocotools indexes them by id, so one of the two would be dropped without a word."""
    seen: set = set()
    for e in entries:
        i = e.get("id") if isinstance(e, dict) else None
        if i is None:
            continue
        if i in seen:
            raise fail(path, f"two {what} have the id {i!r}", f"give each of the {what} its own id")
        seen.add(i)


def field_int(path: Path, ann: dict, key: str) -> int:
    """An annotation's integer field (image_id, category_id), or a one-line ValueError naming the annotation."""
    try:
        return int(ann[key])
    except (KeyError, TypeError, ValueError):
        raise fail(path, f"annotation {ann.get('id', '?')} has {key} {ann.get(key)!r}",
                   f"each annotation needs the integer {key} of its {key.split('_')[0]}") from None


def field_float(path: Path, ann: dict, key: str, default: float) -> float:
    """An annotation's optional number (area), `default` when absent or null, else a one-line ValueError."""
    value = ann.get(key)
    if value is None:
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out) or out < 0:
        raise fail(path, f"annotation {ann.get('id', '?')} has {key} {value!r}",
                   f"{key} is a non-negative number (or leave it out)")
    return out


def box_outside(box_xywh: list[float], h: int, w: int, slack: float = 0.5) -> bool:
    """Whether a box [x, y, w, h] reaches more than `slack` pixels beyond an h x w image."""
    x, y, bw, bh = box_xywh
    return x < -slack or y < -slack or x + bw > w + slack or y + bh > h + slack


def coco_subset(coco: dict, image_ids: list[int]) -> dict:
    """A COCO dict with only the images `image_ids` and their annotations (the ground truth of part of a split)."""
    keep = set(image_ids)
    return {**coco, "images": [im for im in coco["images"] if int(im["id"]) in keep],
            "annotations": [a for a in coco["annotations"] if int(a["image_id"]) in keep]}


def entry_hw(entry: dict) -> tuple[int, int] | None:
    """(height, width) an 'images' entry states, or None when it states none (both must be positive numbers)."""
    try:
        h, w = int(entry["height"]), int(entry["width"])
    except (KeyError, TypeError, ValueError):
        return None
    return (h, w) if h > 0 and w > 0 else None


def coco_image_size(file: Path, img_id: int, stated_hw: tuple[int, int] | None, path: Path, where: str,
                    max_image_pixels: int = 0, upright: bool = True) -> tuple[tuple[int, int], int]:
    """(h, w) of an 'images' entry's file as it will be decoded, and its EXIF orientation, from the header alone
    (nothing decoded: a split of any size costs no memory). The file must exist (where: the flag and folder it is
    looked for under, for the error) and its size be the entry's width and height where it states them:
    annotations in another frame would be silently misplaced (detectron2 checks the same)."""
    if not file.is_file():
        raise FileNotFoundError(f"image {file} (image id {img_id} in {path}) does not exist; put it under {where} "
                                f"or remove it from the annotations")
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
