"""`fastmae detect`: COCO parsing, box transforms, the CenterNet decode, pycocotools scoring, and the command end to end
(CLI, resume, outputs in COCO format, bad inputs)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import fastmae
from fastmae.cli import main
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
from fastmae.metrics.detection import coco_box_metrics
from fastmae.models.detection import (
    CenterNetHead,
    decode,
    encode_targets,
    gaussian_radius,
)
from tests.commands.test_cli_pretrain import make_fmnist, pretrain_tiny

TINY = ["--model.name", "vit_tiny_patch4", "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2"]
FAST = ["--optim.epochs", "1", "--optim.batch_size", "8", "--run.no_progress", "--run.precision", "fp32",
        "--det.channels", "16"]


def scene_args(data, out, train: int = 24, eval_: int = 8, size: int = 32) -> list[str]:
    return ["detect", "--data.path", str(data), "--run.output_dir", str(out), "--det.train_scenes", str(train),
            "--det.eval_scenes", str(eval_), "--det.scene_size", str(size), "--det.figure_rows", "2", *FAST]


def write_coco(root, sizes=((40, 30), (24, 48), (32, 32)), name="train"):
    """Images of several sizes (WxH) with boxes, arbitrary ids, a crowd box and one image without boxes."""
    d = root / name
    d.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{k}.png")
        images.append({"id": 100 + 7 * k, "file_name": f"im{k}.png", "width": w, "height": h})
        if k < len(sizes) - 1:  # the last image is a negative
            anns.append({"id": len(anns) + 1, "image_id": 100 + 7 * k, "category_id": 42 if k % 2 else 7,
                         "bbox": [2.0, 3.0, w / 2, h / 3], "iscrowd": 0})
    anns.append({"id": 99, "image_id": 100, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    ann = {"images": images, "annotations": anns, "categories": [{"id": 42, "name": "cat"}, {"id": 7, "name": "dog"}]}
    path = root / f"{name}.json"
    path.write_text(json.dumps(ann))
    return d, path


# ---------------------------------------------------------------------------------------------------
# Data.


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


# ---------------------------------------------------------------------------------------------------
# The head.


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


# ---------------------------------------------------------------------------------------------------
# Scoring.


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


# ---------------------------------------------------------------------------------------------------
# The command.


def test_detect_end_to_end_on_scenes_resumes_and_loads(tmp_path):
    data, run = pretrain_tiny(tmp_path)
    out = tmp_path / "det"
    assert main(scene_args(data, out) + ["--init", str(run), "--det.eval_every", "1"]) == 0
    res = json.loads((out / "detect.json").read_text())
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert logged[-1]["map"] == pytest.approx(res["map"]) and (out / "learning_curve.png").exists()
    assert {"map", "map50", "map75", "map_small", "map_medium", "map_large", "per_class_ap"} <= set(res)
    assert set(res["per_class_ap"]) == {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                        "Sneaker", "Bag", "Ankle boot"}
    dets = json.loads((out / "detections.json").read_text())
    assert dets and set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    assert all(0 <= d["bbox"][0] and d["bbox"][0] + d["bbox"][2] <= 32 + 1e-4 for d in dets)  # the image's pixels
    assert (out / "detections.png").exists()
    enc = fastmae.load(out)  # a detect run is an encoder for the other commands
    assert type(enc).__name__ == "VisionTransformer" and tuple(enc.patch_embed.img_size) == (32, 32)
    first = (out / "log.jsonl").read_text()
    assert main(scene_args(data, out) + ["--init", str(run), "--optim.epochs", "2"]) == 0  # resumes for epoch 2
    lines = (out / "log.jsonl").read_text()
    assert lines.startswith(first) and lines.count('"epoch"') >= 2


def test_detect_on_coco_files_of_any_size(tmp_path):
    d, ann = write_coco(tmp_path)
    ed, eann = write_coco(tmp_path, sizes=((36, 28), (20, 40)), name="val")
    out = tmp_path / "run"
    args = ["detect", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d), "--det.annotations",
            str(ann), "--data.eval_path", str(ed), "--det.eval_annotations", str(eann), "--model.img_size", "32",
            "32", "--run.output_dir", str(out), *FAST, "--optim.batch_size", "2"]  # 3 training images
    assert main(args) == 0
    dets = json.loads((out / "detections.json").read_text())
    assert {r["image_id"] for r in dets} <= {100, 107} and {r["category_id"] for r in dets} <= {7, 42}
    res = json.loads((out / "detect.json").read_text())
    assert set(res["per_class_ap"]) == {"dog", "cat"}


def test_detect_bad_input_is_one_line(tmp_path, capsys):
    d, ann = write_coco(tmp_path)
    base = ["detect", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d),
            "--run.output_dir", str(tmp_path / "o"), *FAST]
    assert main(base) == 2
    assert "needs --det.annotations FILE" in capsys.readouterr().err
    assert main(base + ["--det.annotations", str(ann)]) == 2
    assert "no evaluation data: pass --data.eval_path DIR" in capsys.readouterr().err
    data = make_fmnist(tmp_path)
    assert main(scene_args(data, tmp_path / "p", size=30) + ["--init", "random", *TINY]) == 2
    assert "not a multiple of the encoder's patch size 4" in capsys.readouterr().err


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


def test_detect_under_two_process_ddp_scores_each_image_once(tmp_path):
    """torchrun --nproc_per_node 2: one set of outputs, every evaluation image's detections exactly once (the shards
    of 7 images are padded to 8), ids and classes as in one process."""
    import os
    import subprocess
    import sys

    data = make_fmnist(tmp_path)
    out = tmp_path / "ddp"
    args = scene_args(data, out, train=16, eval_=7) + ["--init", "random", *TINY, "--run.num_threads", "1",
                                                       "--det.max_detections", "5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastmae", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "x2" in res.stdout
    dets = json.loads((out / "detections.json").read_text())
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert set(per_image) <= set(range(1, 8)) and max(per_image.values(), default=0) <= 5  # at most k per image
    assert len(list(out.glob("checkpoint-*.pt"))) == 1 and (out / "detect.json").exists()


def test_repeated_images_of_padded_shards_are_scored_once(tmp_path, monkeypatch):
    """Every rank's part comes back from the gather; an image two ranks both saw counts once."""
    from fastmae.commands import detect
    from fastmae.models.dense import DenseModel
    from fastmae.models.vit import VisionTransformer
    from fastmae.train.dense import inference
    from fastmae.train.dist import DistInfo
    from fastmae.train.runtime import Runtime

    data = make_fmnist(tmp_path)
    split = fashion_det_scenes(str(data), "eval", 5, 32, (1, 2), 0)
    loader = DetLoader(split, (32, 32), train=False, drop_last=False, channels=1, mean=(0.5,), std=(0.5,),
                       batch_size=2, num_classes=10)
    enc = VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                            global_pool="token")
    model = DenseModel(enc, CenterNetHead(16, 10, 4, channels=8, max_detections=3))
    torch.nn.init.constant_(model.head.size[-1].bias, 4.0)  # boxes of 16 px: none dropped as degenerate
    rt = Runtime(device=torch.device("cpu"), precision="fp32", precision_label="fp32", dist=DistInfo(), out_dir=tmp_path,
                 logger=None, run=None)
    monkeypatch.setattr(detect, "gather_objects", lambda obj, info: [obj, {k: v for k, v in obj.items() if k < 2}])
    dets, _ = inference(model, model, loader, detect.DetEvaluator(model.head, split, rt), rt)
    assert len(dets) == 5 * 3 and len({(d["image_id"], tuple(d["bbox"]), d["score"]) for d in dets}) == 15
