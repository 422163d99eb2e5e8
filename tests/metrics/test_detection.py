"""Box AP (metrics/detection.py) is pycocotools' own."""

from __future__ import annotations

import pytest

from fastmae.metrics.detection import coco_box_metrics


def test_box_ap_is_pycocotools_own():
    """The wrapper gives what pycocotools gives on a toy set: perfect detections score 100, a shifted one less."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [{"id": 3, "height": 50, "width": 60}, {"id": 9, "height": 50, "width": 60}],
          "annotations": [{"id": 1, "image_id": 3, "category_id": 11, "bbox": [5, 5, 20, 30], "area": 600, "iscrowd": 0},
                          {"id": 2, "image_id": 9, "category_id": 12, "bbox": [30, 10, 25, 25], "area": 625, "iscrowd": 0}],
          "categories": [{"id": 11, "name": "a"}, {"id": 12, "name": "b"}]}
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    m = coco_box_metrics(gt, perfect)
    assert m["map"] == pytest.approx(100.0) and m["per_class_ap"] == {"a": pytest.approx(100.0), "b": pytest.approx(100.0)}
    assert m["map_large"] is None  # no large box in the set
    shifted = [{**perfect[0], "bbox": [8, 9, 20, 30]}, perfect[1]]
    m = coco_box_metrics(gt, shifted)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(shifted), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert m["map"] == pytest.approx(100 * ev.stats[0]) and m["map50"] == pytest.approx(100 * ev.stats[1])
    assert 0 < m["map"] < 100
    assert coco_box_metrics(gt, [])["map"] == 0.0

