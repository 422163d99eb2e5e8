"""COCO box AP by pycocotools' COCOeval (the reference implementation; nothing here recomputes it).

`coco_box_metrics(gt, detections)` takes the ground truth as a COCO instances dict and detections in COCO results
format ({'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}) and returns AP in %: map (IoU .50:.95), map50,
map75, map_small / medium / large (None where the split has no box of that size), and per_class_ap by category
name (COCOeval's precision array at all areas, 100 detections, averaged over IoU thresholds and recall; None for a
category without ground truth).
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def coco_box_metrics(gt: dict, detections: list[dict]) -> dict:
    """AP in % of `detections` against `gt` (both COCO dicts/lists), computed by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = copy.deepcopy(gt)
    for i, a in enumerate(gt["annotations"]):  # fields COCOeval needs that a user's file may leave out
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() and summarize() print their progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        if not detections:
            return {**dict.fromkeys(STATS, 0.0), "per_class_ap": {n: 0.0 for n in names.values()}}
        dt = coco.loadRes(copy.deepcopy(detections))
        ev = COCOeval(coco, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: (None if v < 0 else 100.0 * float(v)) for k, v in zip(STATS, ev.stats[:6])}
    precision = ev.eval["precision"]  # (T iou, R recall, K categories, A areas, M max dets)
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[names[cid]] = 100.0 * float(np.mean(p)) if p.size else None
    out["per_class_ap"] = per_class
    return out
