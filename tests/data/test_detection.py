"""Detection data (data/detection.py): COCO instances files read and checked, boxes through the
letterboxed canvas, the built-in scenes, the loader."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fastmae.data.detection import (
    DetLoader,
    coco_dict,
    fashion_det_scenes,
    flip_boxes,
    letterbox_scale,
    map_boxes,
    read_coco,
    scene_instances,
    unmap_boxes,
)
from tests.helpers.cli import make_fmnist
from tests.helpers.coco import write_coco


def test_coco_ids_are_mapped_not_assumed_crowd_skipped_negatives_kept(tmp_path):
    d, ann = write_coco(tmp_path)
    split = read_coco(str(d), str(ann), 3, ("--data.path", "--det.annotations"))
    assert split.category_ids == [7, 42] and split.classes == ["dog", "cat"]  # sorted by id, then indices 0..K-1
    assert split.image_ids == [100, 107, 114]
    assert [len(b) for b in split.boxes] == [1, 1, 0]  # the crowd box is not trained on; a negative has none
    assert split.labels[0].tolist() == [0] and split.labels[1].tolist() == [1]
    torch.testing.assert_close(split.boxes[0], torch.tensor([[2.0, 3.0, 22.0, 13.0]]))
    assert tuple(split.images[1].shape) == (3, 48, 24)
    ev = read_coco(str(d), str(ann), 3, ("--data.eval_path", "--det.eval_annotations"),
                   categories=list(zip(split.category_ids, split.classes)))
    assert ev.category_ids == [7, 42]



@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a["annotations"].append({"id": 5, "image_id": 100, "category_id": 3, "bbox": [0, 0, 2, 2]}),
     "category_id 3, which is not in 'categories'"),
    (lambda a: a["annotations"].append({"id": 6, "image_id": 100, "category_id": 7, "bbox": [0, 0, 0, 2]}),
     "bbox [0.0, 0.0, 0.0, 2.0]: a box is [x, y, w, h] with w, h > 0"),
    (lambda a: a["annotations"].append({"id": 7, "image_id": 100, "category_id": 7, "bbox": [30, 20, 40, 5]}),
     "lies outside the 40x30 (WxH) image"),
    (lambda a: a["annotations"].append({"id": 8, "image_id": 5, "category_id": 7, "bbox": [0, 0, 2, 2]}),
     "image_id 5, which is not in 'images'"),
    (lambda a: a.pop("categories"), "not COCO instances annotations"),
])
def test_bad_coco_files_are_one_line_naming_the_file(tmp_path, change, message):
    d, ann = write_coco(tmp_path)
    data = json.loads(ann.read_text())
    change(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="train.json: .*" + re.escape(message)):
        read_coco(str(d), str(ann), 3, ("--data.path", "--det.annotations"))



def test_a_missing_image_names_itself_and_the_fix(tmp_path):
    d, ann = write_coco(tmp_path)
    (d / "im1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"im1.png \(image id 107 in .*train.json\) does not exist"):
        read_coco(str(d), str(ann), 3, ("--data.path", "--det.annotations"))



@pytest.mark.parametrize(("h", "w", "H", "W"), [(30, 40, 64, 64), (48, 24, 32, 96), (84, 84, 84, 84)])
def test_boxes_round_trip_through_the_canvas(h, w, H, W):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(5, 2, generator=g) * torch.tensor([w, h]) / 2
    boxes = torch.cat([xy, xy + torch.rand(5, 2, generator=g) * torch.tensor([w, h]) / 2], 1)
    s = letterbox_scale(h, w, H, W)
    assert round(h * s) <= H and round(w * s) <= W and (round(h * s) == H or round(w * s) == W)
    canvas = map_boxes(boxes, s * 0.7, dx=3, dy=5)
    torch.testing.assert_close(unmap_boxes(canvas, s * 0.7, h, w, dx=3, dy=5), boxes)
    torch.testing.assert_close(flip_boxes(flip_boxes(boxes, w), w), boxes)



def test_scene_boxes_are_the_visible_extent_of_each_item():
    items = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    items[0, 0, 1:3, 1:4] = 200  # visible rows 1-2, columns 1-3
    items[1, 0] = 200  # a full square
    images, boxes, classes = scene_instances(items, torch.tensor([3, 5]), 30, 12, (1, 3), seed=0)
    for img, b, c in zip(images, boxes, classes):
        assert len(b) == len(c) and len(b) >= 1
        for (x1, y1, x2, y2) in b.tolist():
            assert 0 <= x1 < x2 <= 12 and 0 <= y1 < y2 <= 12
            inside = img[0, int(y1):int(y2), int(x1):int(x2)] > 32
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # tight



def test_loader_letterboxes_and_maps_boxes(tmp_path):
    d, ann = write_coco(tmp_path)
    split = read_coco(str(d), str(ann), 3, ("--data.path", "--det.annotations"))
    kw = dict(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=3, num_classes=2)
    ev = DetLoader(split, (32, 32), train=False, drop_last=False, **kw)
    ev.set_epoch(0)
    x, t = next(iter(ev))
    assert x.shape == (3, 3, 32, 32) and t["image_id"] == [100, 107, 114]
    s = letterbox_scale(30, 40, 32, 32)  # image 0 is 40x30: scaled to 32x24, padded below
    torch.testing.assert_close(t["boxes"][0], split.boxes[0] * s)
    # padding is the mean colour: 0 after normalisation, within half a uint8 step (pixels cross as uint8)
    assert x[0, :, 25:, :].abs().max() <= 0.5 / 255 / 0.25 + 1e-6
    tr = DetLoader(split, (32, 32), train=True, **kw)
    tr.set_epoch(3)
    a = next(iter(tr))
    tr.set_epoch(3)
    b = next(iter(tr))
    assert torch.equal(a[0], b[0]) and all(torch.equal(p, q) for p, q in zip(a[1]["boxes"], b[1]["boxes"]))
    for boxes in a[1]["boxes"]:
        assert boxes.numel() == 0 or (boxes.min() >= 0 and boxes.max() <= 32)



def test_scenes_are_a_pure_function_of_the_seed(tmp_path):
    data = make_fmnist(tmp_path)
    a = fashion_det_scenes(str(data), "train", 6, 32, (1, 3), seed=0)
    b = fashion_det_scenes(str(data), "train", 6, 32, (1, 3), seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes)) and a.coco == coco_dict(b)



def test_a_category_without_training_boxes_is_warned(tmp_path, caplog):
    d, ann = write_coco(tmp_path, sizes=((40, 30), (32, 32)))  # one boxed image (category 7), one negative
    split = read_coco(str(d), str(ann), 3, ("--data.path", "--det.annotations"))
    from fastmae.data.detection import warn_empty_classes

    with caplog.at_level("WARNING"):
        assert warn_empty_classes(split) == ["cat"]
    assert "category 'cat' has no training boxes" in caplog.text

