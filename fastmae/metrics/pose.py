"""Keypoint scores: OKS AP by pycocotools' COCOeval (iouType 'keypoints', the reference implementation), and PCK.

`coco_keypoint_metrics(gt, results, sigmas)` takes the ground truth as a COCO keypoints dict and predictions in COCO
results format ({'image_id', 'category_id', 'keypoints': [x, y, score] * K, 'score'}) and returns, in %: ap (OKS
.50:.95), ap50, ap75, ar (recall at OKS .50:.95, 20 detections per image), with `sigmas` as COCOeval's
kpt_oks_sigmas. `pck` is the share of labelled keypoints predicted within a fraction of their box's longer side
(no library computes it alone; it is one comparison).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np
import torch

KEYPOINT_STATS = {"ap": 0, "ap50": 1, "ap75": 2, "ar": 5}  # indices into COCOeval.stats for keypoints


def coco_keypoint_metrics(gt: dict, results: list[dict], sigmas: Sequence[float]) -> dict:
    """OKS AP / AR in % of `results` against `gt` (COCO dicts/lists), computed by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = copy.deepcopy(gt)
    for i, a in enumerate(gt["annotations"]):  # fields COCOeval needs that a user's file may leave out
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
        a.setdefault("num_keypoints", int(sum(v > 0 for v in a["keypoints"][2::3])))
    if not results:
        return dict.fromkeys(KEYPOINT_STATS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() and summarize() print their progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dt = coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco, dt, iouType="keypoints")
        ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(0.0, 100.0 * float(ev.stats[i])) for k, i in KEYPOINT_STATS.items()}


def pck(pred: torch.Tensor, truth: torch.Tensor, boxes: torch.Tensor,
        thresholds: Sequence[float] = (0.05, 0.1)) -> dict[str, float]:
    """PCK in %: of the labelled keypoints (truth v > 0) of N instances, the share predicted within t x the longer
    side of the instance's box. pred (N, K, 2), truth (N, K, 3), boxes (N, 4) x y w h; keys 'pck@0.05', ..."""
    labelled = truth[..., 2] > 0  # (N, K)
    err = (pred - truth[..., :2]).norm(dim=-1)  # (N, K)
    side = boxes[:, 2:].amax(1, keepdim=True)  # (N, 1)
    n = int(labelled.sum())
    return {f"pck@{t:g}": (100.0 * float(((err <= t * side) & labelled).sum()) / n if n else 0.0)
            for t in thresholds}
