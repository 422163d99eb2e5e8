"""The CenterNet head (models/detection.py): targets, decode, and learning a toy box."""

from __future__ import annotations

import pytest
import torch

from fastmae.models.detection import (
    CenterNetHead,
    decode,
    encode_targets,
    gaussian_radius,
)


def test_decode_finds_hand_made_peaks():
    heat = torch.zeros(1, 3, 8, 8)
    heat[0, 2, 3, 5] = 0.9  # a peak of class 2 at (x 5, y 3)
    heat[0, 2, 3, 4] = 0.5  # its neighbour: not a local maximum
    heat[0, 0, 6, 1] = 0.7
    size = torch.zeros(1, 2, 8, 8)
    size[0, :, 3, 5] = torch.tensor([2.0, 4.0])
    offset = torch.zeros(1, 2, 8, 8)
    offset[0, :, 3, 5] = torch.tensor([0.5, 0.25])
    (boxes, scores, labels), = decode(heat, size, offset, stride=4, k=2)
    assert labels.tolist() == [2, 0] and scores.tolist() == pytest.approx([0.9, 0.7])
    cx, cy = (5 + 0.5) * 4, (3 + 0.25) * 4
    torch.testing.assert_close(boxes[0], torch.tensor([cx - 4, cy - 8, cx + 4, cy + 8]))



def test_targets_put_a_unit_peak_at_each_centre_and_decode_back():
    boxes = [torch.tensor([[8.0, 4.0, 24.0, 20.0]]), torch.zeros(0, 4)]
    heat, cells, size, offset = encode_targets(boxes, [torch.tensor([1]), torch.zeros(0, dtype=torch.long)], 2,
                                               (8, 8), stride=4)
    assert cells.tolist() == [[0, 3, 4]] and heat[0, 1, 3, 4] == 1 and heat[1].sum() == 0
    assert heat[0, 0].sum() == 0 and 0 < heat[0, 1, 3, 3] < 1  # a Gaussian around the centre
    full_size, full_off = torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8)
    full_size[0, :, 3, 4], full_off[0, :, 3, 4] = size[0], offset[0]
    (b, s, lab), _ = decode(heat, full_size, full_off, stride=4, k=1)
    torch.testing.assert_close(b[0], boxes[0][0])
    assert gaussian_radius(4, 4) > 0



def test_the_head_learns_a_toy_box():
    torch.manual_seed(0)
    head = CenterNetHead(8, 2, patch_size=4, stride=4, channels=8)
    feats = torch.randn(2, 8, 6, 6)
    t = {"boxes": [torch.tensor([[4.0, 4.0, 12.0, 16.0]])] * 2, "labels": [torch.tensor([1])] * 2}
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    first = None
    for _ in range(150):
        terms = head.loss(head(feats), t)
        assert set(terms) == {"loss_focal", "loss_size", "loss_offset"}  # logged apart in log.jsonl
        loss = sum(terms.values())
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 5
    (boxes, scores, labels) = head.predict(head(feats))[0]
    assert labels[0] == 1 and float(scores[0]) > 0.5
    torch.testing.assert_close(boxes[0], torch.tensor([4.0, 4.0, 12.0, 16.0]), atol=1.5, rtol=0)

