"""Boxes for top-down pose: a detector's detections or a boxes file (COCO annotations, or records with file_name
such as a detector's predictions.json), each image's as ([x, y, w, h], score) in its own pixels."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from .models import TaskModel

log = logging.getLogger(__name__)

Boxes = list[list[tuple[list[float], float]]]  # per image: ([x, y, w, h], score)


def detector_category(det: TaskModel, category: str, where: str) -> int | None:
    """The COCO category id of --predict.category among the detector's classes (a name or an id); None = every
    class of a one-class detector. One line when the detector has several classes and none is named, or lacks it."""
    known = ", ".join(f"{n} ({c})" for n, c in zip(det.classes, det.category_ids))
    if not category:
        if len(det.classes) > 1:
            raise ValueError(f"the detector {where} has {len(det.classes)} classes ({known}); pass --predict.category "
                             f"with the one whose boxes hold the keypoints")
        return None
    for name, cid in zip(det.classes, det.category_ids):
        if category == name or category == str(cid):
            return cid
    raise ValueError(f"--predict.category {category!r} is not a class of the detector {where} ({known})")


def boxes_from_records(per_image: Sequence[Sequence[dict]], threshold: float, category: int | None) -> Boxes:
    """Each image's detections scoring at least `threshold` (of `category` unless None) as boxes."""
    return [[(list(r["bbox"]), float(r["score"])) for r in recs
             if r["score"] >= threshold and (category is None or r["category_id"] == category)]
            for recs in per_image]


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"--predict.boxes {path}: {problem}")


def _box(value, path: Path, what: str) -> list[float] | None:
    """[x, y, w, h] as floats; None for an empty box (w or h <= 0: left out, as the training commands leave them)."""
    try:
        b = [float(v) for v in value]
    except (TypeError, ValueError):
        b = []
    if len(b) != 4 or not all(math.isfinite(v) for v in b):
        raise _fail(path, f"{what} has bbox {value!r}; a box is [x, y, w, h], four numbers")
    return b if b[2] > 0 and b[3] > 0 else None


def boxes_from_file(path: str, names: Sequence[str], threshold: float, category: str, partial: bool = False) -> Boxes:
    """Boxes of the images `names` (their reported names) from a COCO annotations file (images matched by
    file_name) or a list of records with 'file_name' and 'bbox' (and 'score', 'category_id'). Boxes with a score
    below `threshold` and, with `category` (a name or id), of another category are left out. A file naming an image
    not among `names` is refused unless `partial` (--data.limit took only some)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--predict.boxes {p} does not exist; pass a COCO annotations file or a "
                                f"predictions.json") from None
    except (OSError, ValueError) as e:
        raise _fail(p, f"cannot be read as JSON ({e})") from None
    cat_names: dict[int, str] = {}
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        try:
            file_of = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
            cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories") or []}
            entries = [(file_of[int(a["image_id"])], a) for a in data.get("annotations") or []
                       if not a.get("iscrowd", 0)]
        except (KeyError, TypeError, ValueError) as e:
            raise _fail(p, f"an image lacks id or file_name, or an annotation names an image not in 'images' ({e!r})") \
                from None
    elif isinstance(data, list):
        if data and not all(isinstance(r, dict) and "file_name" in r for r in data):
            raise _fail(p, "its records name images by image_id only; add 'file_name' to each (as fastmae predict "
                           "writes them) or pass the COCO annotations file with the boxes")
        entries = [(str(r["file_name"]), r) for r in data]
    else:
        raise _fail(p, "is neither COCO annotations (an object with 'images' and 'annotations') nor a list of records")
    wanted = None
    if category:
        ids = [c for c, n in cat_names.items() if n == category]
        wanted = ids[0] if ids else (int(category) if category.lstrip("-").isdigit() else None)
        if wanted is None:
            raise _fail(p, f"no category is named {category!r} (categories: {sorted(cat_names.values())})")
    index = {n: i for i, n in enumerate(names)}
    out: Boxes = [[] for _ in names]
    empty = 0
    for name, r in entries:
        if name not in index:
            if partial:
                continue
            raise _fail(p, f"names image {name!r}, which is not among the images under --data.path ({len(names)} "
                           f"images, e.g. {names[0]!r}); file_name must be the path relative to --data.path")
        score = float(r.get("score", 1.0))
        if score < threshold or (wanted is not None and int(r.get("category_id", wanted)) != wanted):
            continue
        box = _box(r.get("bbox"), p, f"a box of {name!r}")
        if box is None:
            empty += 1
        else:
            out[index[name]].append((box, score))
    if empty:
        log.warning("--predict.boxes %s: left out %d empty boxes (width or height 0)", p, empty)
    return out


__all__ = ["Boxes", "boxes_from_file", "boxes_from_records", "detector_category"]
