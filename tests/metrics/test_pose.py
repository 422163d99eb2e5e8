"""OKS AP (metrics/pose.py) is pycocotools' own; PCK counts labelled keypoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmae.metrics.pose import coco_keypoint_metrics, pck


def test_oks_ap_is_pycocotools_own_and_pck_counts_labelled_keypoints():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    kp = [10.0, 10.0, 2, 30.0, 12.0, 2, 20.0, 40.0, 1]
    gt = {"images": [{"id": 4, "height": 60, "width": 50}],
          "annotations": [{"id": 1, "image_id": 4, "category_id": 2, "bbox": [5, 5, 30, 40], "area": 900.0,
                           "num_keypoints": 3, "keypoints": kp, "iscrowd": 0}],
          "categories": [{"id": 2, "name": "x", "keypoints": ["a", "b", "c"], "skeleton": []}]}
    sig = [0.05, 0.05, 0.1]
    perfect = [{"image_id": 4, "category_id": 2, "keypoints": [10, 10, 1, 30, 12, 1, 20, 40, 1], "score": 0.9}]
    assert coco_keypoint_metrics(gt, perfect, sig)["ap"] == pytest.approx(100.0)
    off = [{**perfect[0], "keypoints": [12, 10, 1, 30, 15, 1, 20, 40, 1]}]
    m = coco_keypoint_metrics(gt, off, sig)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(off), "keypoints")
    ev.params.kpt_oks_sigmas = np.array(sig)
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert m["ap"] == pytest.approx(100 * ev.stats[0]) and m["ar"] == pytest.approx(100 * ev.stats[5])
    assert 0 < m["ap"] < 100
    truth = torch.tensor([[[10.0, 10.0, 2], [30.0, 12.0, 2], [20.0, 40.0, 0]]])
    pred = torch.tensor([[[11.0, 10.0], [30.0, 17.0], [90.0, 90.0]]])
    p = pck(pred, truth, torch.tensor([[5.0, 5.0, 30.0, 40.0]]))  # 0.05 x 40 = 2 px, 0.1 x 40 = 4 px
    assert p == {"pck@0.05": 50.0, "pck@0.1": 50.0}

