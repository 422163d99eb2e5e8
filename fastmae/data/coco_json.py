"""Reading a COCO annotations JSON (instances or keypoints) with one-line errors naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path


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
