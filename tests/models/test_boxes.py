"""Box ops (models/boxes.py): IoU, the GIoU loss, and NMS against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from fastmae.models.boxes import batched_nms, box_iou, giou_loss


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes, in plain Python floats."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _brute_nms(boxes: list[list[float]], scores: list[float], thr: float, groups: list[int]) -> list[int]:
    """Greedy NMS as the textbook states it: repeatedly take the best remaining box, drop those of its group that
    overlap it above thr."""
    left = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep = []
    while left:
        best = left.pop(0)
        keep.append(best)
        left = [i for i in left if groups[i] != groups[best] or _iou(boxes[i], boxes[best]) <= thr]
    return keep


def _random_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 40
    wh = torch.rand(n, 2, generator=g) * 20 + 1
    return torch.cat([xy, xy + wh], 1)


def test_iou_matches_the_plain_formula():
    g = torch.Generator().manual_seed(0)
    a, b = _random_boxes(g, 7), _random_boxes(g, 5)
    want = torch.tensor([[_iou(x, y) for y in b.tolist()] for x in a.tolist()])
    torch.testing.assert_close(box_iou(a, b), want)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_equals_brute_force_and_leaves_no_overlap(seed, thr):
    g = torch.Generator().manual_seed(seed)
    n = 60
    boxes, scores = _random_boxes(g, n), torch.rand(n, generator=g)
    groups = torch.randint(0, 3, (n,), generator=g)
    for grp in (None, groups):
        keep = batched_nms(boxes, scores, thr, grp)
        gl = [0] * n if grp is None else grp.tolist()
        assert keep.tolist() == _brute_nms(boxes.tolist(), scores.tolist(), thr, gl)
        assert (scores[keep].diff() <= 0).all()  # best first
        kb, kg = boxes[keep], torch.tensor(gl)[keep]
        over = (box_iou(kb, kb) > thr) & (kg[:, None] == kg[None, :])
        assert not over.fill_diagonal_(False).any()  # no two kept boxes of one group above the threshold


def test_nms_keeps_the_best_of_duplicates_and_separate_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.5, 0.9, 0.3, 0.5])
    assert batched_nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert batched_nms(boxes, scores, 0.5, torch.tensor([0, 1, 0, 0])).tolist() == [1, 0, 2]  # other class
    assert batched_nms(boxes, scores, 1.0).tolist() == [1, 0, 3, 2]  # nothing overlaps above 1; ties by index
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_giou_loss_is_zero_on_equal_boxes_and_grows_apart():
    a = torch.tensor([[0.0, 0, 10, 10]] * 3)
    b = torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [20.0, 0, 30, 10]])
    loss = giou_loss(a, b)
    assert loss[0] == pytest.approx(0, abs=1e-6) and loss[0] < loss[1] < loss[2] < 2
    assert loss[1] == pytest.approx(1 - (50 / 150 - 0 / 150), abs=1e-6)  # hull 150 = union: GIoU = IoU
    assert loss[2] == pytest.approx(1 - (0 - 100 / 300), abs=1e-6)  # disjoint: still a gradient
    p = a.clone().requires_grad_()
    giou_loss(p, b[2:].expand(3, -1)).sum().backward()
    assert p.grad.abs().sum() > 0


def test_a_drawing_shows_each_object_once_with_its_best_label():
    from fastmae.figures.predictions import drawn_detections

    recs = [{"bbox": [0, 0, 10, 10], "score": 0.5, "category_id": 1},
            {"bbox": [0.5, 0, 10, 10], "score": 0.9, "category_id": 2},  # the same object, another class: hidden
            {"bbox": [20, 20, 5, 5], "score": 0.4, "category_id": 1},
            {"bbox": [40, 40, 5, 5], "score": 0.1, "category_id": 1}]  # below the score: not drawn
    assert drawn_detections(recs, 0.3) == [recs[1], recs[2]]
    assert drawn_detections(recs[3:], 0.3) == []
