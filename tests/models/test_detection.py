"""The multi-level CenterNet head (models/detection.py): levels, targets, decode, suppression, learning a toy box."""

from __future__ import annotations

import pytest
import torch

from fastmae.models.detection import (
    CenterNetHead,
    auto_strides,
    check_strides,
    decode_level,
    encode_level,
    gaussian_radius,
    level_of,
    level_shape,
)


def test_objects_go_to_levels_by_their_longer_side():
    boxes = torch.tensor([
        [0, 0, 4, 4],      # side 4: stride 2 (up to 16)
        [0, 0, 16, 3],     # 16: still stride 2 (ranges are closed above)
        [0, 0, 3, 17],     # 17: stride 4 (16-32)
        [10, 10, 42, 20],  # 32: stride 4
        [0, 0, 33, 33],    # 33: stride 8 (above 32, the last level takes the rest)
        [0, 0, 200, 5],    # 200: stride 8
    ], dtype=torch.float32)
    assert level_of(boxes, (2, 4, 8)).tolist() == [0, 0, 1, 1, 2, 2]
    assert level_of(boxes, (4,)).tolist() == [0] * 6  # one level takes every object


def test_default_strides_and_their_checks():
    assert auto_strides(4, (84, 84)) == (4, 8, 16) and auto_strides(16, (512, 512)) == (16, 32, 64)
    assert auto_strides(4, (28, 28)) == (4, 8)  # a 7x7 grid: stride 16 would leave 1x1 cells
    assert level_shape((84, 84), 4, 2) == (42, 42) and level_shape((84, 84), 4, 8) == (10, 10)
    assert check_strides((2, 4), 4, (84, 84)) == (2, 4)
    for bad in [(3,), (4, 2), (4, 4), ()]:
        with pytest.raises(ValueError, match="--det.strides"):
            check_strides(bad, 4, (84, 84))
    with pytest.raises(ValueError, match="leaves no cell"):
        check_strides((4, 64), 4, (32, 32))


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_decode_finds_hand_made_boxes_at_every_level(stride):
    H = W = 8
    heat = torch.zeros(1, 3, H, W)
    heat[0, 2, 3, 5] = 0.9  # a peak of class 2 at cell (x 5, y 3)
    heat[0, 2, 3, 4] = 0.5  # its neighbour: not a local maximum
    heat[0, 0, 6, 1] = 0.7
    dist = torch.ones(1, 4, H, W)
    dist[0, :, 3, 5] = torch.tensor([1.0, 2.0, 3.0, 4.0]) * stride
    boxes, scores, labels = decode_level(heat, dist, stride, k=2)
    assert labels[0].tolist() == [2, 0] and scores[0].tolist() == pytest.approx([0.9, 0.7])
    cx, cy = 5.5 * stride, 3.5 * stride
    torch.testing.assert_close(boxes[0, 0], torch.tensor([cx - stride, cy - 2 * stride, cx + 3 * stride,
                                                           cy + 4 * stride]))


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_targets_decode_back_to_their_box(stride):
    box = torch.tensor([[8.0, 4.0, 24.0, 20.0]])
    H = W = 64 // stride
    heat, target, weight = encode_level([box, torch.zeros(0, 4)], [torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
                                        2, (H, W), stride)
    cy, cx = int(12 / stride), int(16 / stride)
    assert heat[0, 1, cy, cx] == 1 and heat[1].sum() == 0 and heat[0, 0].sum() == 0
    assert weight[0].sum() == pytest.approx(1) and weight[1].sum() == 0 and weight[0, cy, cx] == weight[0].max()
    ys, xs = weight[0].nonzero(as_tuple=True)
    assert (target[0][:, ys, xs] == box.T).all()  # every weighted cell regresses the box
    # the distances a perfect head would give at each cell decode back to the box at the peak
    centres_x, centres_y = (torch.arange(W) + 0.5) * stride, (torch.arange(H) + 0.5) * stride
    dist = torch.stack([centres_x[None].expand(H, W) - 8, centres_y[:, None].expand(H, W) - 4,
                        24 - centres_x[None].expand(H, W), 20 - centres_y[:, None].expand(H, W)])[None]
    boxes, scores, labels = decode_level(heat[:1], dist, stride, k=1)
    assert labels[0, 0] == 1 and scores[0, 0] == 1
    torch.testing.assert_close(boxes[0, 0], box[0])
    assert gaussian_radius(4, 4) > 0


def test_the_smaller_box_keeps_a_shared_cell():
    big, small = [0.0, 0.0, 32.0, 32.0], [12.0, 12.0, 20.0, 20.0]  # one centre cell at stride 4
    for order in ([big, small], [small, big]):
        _, target, weight = encode_level([torch.tensor(order)], [torch.tensor([0, 1])], 2, (8, 8), 4)
        assert target[0, :, 4, 4].tolist() == small


def test_predict_suppresses_across_levels_per_class_or_across_classes():
    head = CenterNetHead(8, 3, patch_size=4, strides=(2, 4), channels=8, max_detections=10, nms_iou=0.5)
    heat = [torch.full((1, 3, 8, 8), -10.0), torch.full((1, 3, 4, 4), -10.0)]
    box = [torch.full((1, 4, 8, 8), 1.0), torch.full((1, 4, 4, 4), 1.0)]
    heat[0][0, 0, 2, 2] = 3.0  # an object at (5, 5) as class 0 ...
    heat[0][0, 1, 2, 2] = 2.0  # ... and class 1 at the same place
    box[0][0, :, 2, 2] = 4.0
    heat[1][0, 0, 1, 1] = 1.0  # ... and class 0 again on the coarser level, about the same box
    box[1][0, :, 1, 1] = 4.5
    heat[0][0, 1, 6, 6] = 0.5  # another object, elsewhere
    box[0][0, :, 6, 6] = 2.0
    out = {"heat": heat, "box": box}
    (boxes, scores, labels), = head.predict(out)  # per class: the coarser class-0 box goes, class 1's guess stays
    assert (scores.diff() <= 0).all() and scores[3] < 0.01  # flat background: only near-zero peaks follow
    assert labels[:3].tolist() == [0, 1, 1] and scores[0] == pytest.approx(torch.tensor(3.0).sigmoid())
    torch.testing.assert_close(boxes[0], torch.tensor([1.0, 1.0, 9.0, 9.0]))
    torch.testing.assert_close(boxes[1], boxes[0])
    head.class_agnostic = True  # across classes: one box for the first object
    (boxes, scores, labels), = head.predict(out)
    assert labels[:2].tolist() == [0, 1] and scores[2] < 0.01
    torch.testing.assert_close(boxes[1], torch.tensor([11.0, 11.0, 15.0, 15.0]))
    head.nms_iou = 1.0  # no suppression: all three peaks of the first object stay
    (_, _, labels), = head.predict(out)
    assert sorted(labels.tolist()[:4]) == [0, 0, 1, 1]


def test_the_head_learns_a_toy_box_on_two_levels():
    torch.manual_seed(0)
    head = CenterNetHead(8, 2, patch_size=4, strides=(2, 4), channels=8)
    feats = torch.randn(2, 8, 6, 6)
    t = {"boxes": [torch.tensor([[2.0, 2.0, 22.0, 20.0], [2.0, 2.0, 7.0, 6.0]])] * 2,  # sides 20 (stride 4), 5 (2)
         "labels": [torch.tensor([1, 0])] * 2}
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    first = None
    for _ in range(200):
        terms = head.loss(head(feats), t)
        assert set(terms) == {"loss_focal", "loss_box"}  # logged apart in log.jsonl
        loss = sum(terms.values())
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 5
    boxes, scores, labels = head.predict(head(feats))[0]
    assert labels[:2].sort().values.tolist() == [0, 1] and float(scores[1]) > 0.5
    for want in t["boxes"][0]:
        assert min(float((b - want).abs().max()) for b in boxes[:2]) < 1.5
