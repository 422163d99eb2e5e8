"""Dense-task data read by workers (data/dense.py): splits hold paths and header sizes, never pixels; batches do not
depend on the number of workers; a resumed epoch replays exactly; DDP ranks read disjoint images; a file that fails in
a worker is one line in the main process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastmae.data.dense as dense
from fastmae.data.detection import DetLoader, read_coco
from fastmae.data.pose import PoseLoader, read_coco_keypoints
from fastmae.models.pose import flip_index

FLAGS = ("--data.path", "--det.annotations")


def coco_files(root, n: int = 12, keypoints: bool = False):
    """n PNG images of several sizes with one box each (and three keypoints with keypoints=True)."""
    d = root / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for k in range(n):
        w, h = 40 + 4 * (k % 3), 30 + 6 * (k % 2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{k}.png")
        images.append({"id": 10 + k, "file_name": f"im{k}.png", "width": w, "height": h})
        a = {"id": k + 1, "image_id": 10 + k, "category_id": 1, "bbox": [3.0, 4.0, 20.0, 16.0], "iscrowd": 0}
        if keypoints:
            a["keypoints"] = [6.0, 8.0, 2, 18.0, 8.0, 2, 12.0, 16.0, 1]
        anns.append(a)
    cat = {"id": 1, "name": "thing"}
    if keypoints:
        cat.update(keypoints=["left_a", "right_a", "mid"], skeleton=[[1, 3], [2, 3]])
    path = root / "ann.json"
    import json

    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [cat]}))
    return d, path


def batches(loader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch, start)
    out = list(loader)
    loader.close()
    return out


def same(a, b) -> bool:
    """Batches (images, targets) equal bit for bit, targets of any structure."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_coco_split_holds_paths_and_header_sizes_and_decodes_nothing(tmp_path, monkeypatch):
    d, ann = coco_files(tmp_path, keypoints=True)

    def no_decode(*a, **k):
        raise AssertionError("reading a split must not decode an image")

    monkeypatch.setattr(dense, "decode_image_uint8", no_decode)
    split = read_coco(str(d), str(ann), 3, FLAGS)  # an instances reader ignores the keypoints
    assert split.images.memory is None and len(split.images) == 12
    assert split.images.hw(1) == (36, 44) and split.images.files[1].endswith("im1.png")
    pose = read_coco_keypoints(str(d), str(ann), 3, FLAGS)
    assert pose.images.memory is None and pose.images.sizes == split.images.sizes


@pytest.mark.parametrize("task", ["detect", "pose"])
def test_batches_do_not_depend_on_the_workers_and_a_resumed_epoch_replays(tmp_path, task):
    d, ann = coco_files(tmp_path, keypoints=task == "pose")
    kw = dict(train=True, batch_size=4, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)
    if task == "detect":
        split = read_coco(str(d), str(ann), 3, FLAGS)
        make = lambda w: DetLoader(split, (32, 32), num_workers=w, num_classes=1, **kw)  # noqa: E731
    else:
        split = read_coco_keypoints(str(d), str(ann), 3, FLAGS)
        flip = flip_index(split.keypoint_names)
        make = lambda w: PoseLoader(split, (32, 24), flip=flip, num_workers=w, **kw)  # noqa: E731
    main, workers = batches(make(0), epoch=2), batches(make(2), epoch=2)
    assert len(main) == 3 and same(main, workers)
    assert same(batches(make(1), epoch=2, start=1), main[1:])  # resumed at batch 1: the same tail
    assert not same(batches(make(0), epoch=3), main)  # another epoch, another order and augmentation


def test_ddp_ranks_read_disjoint_images(tmp_path):
    d, ann = coco_files(tmp_path)
    split = read_coco(str(d), str(ann), 3, FLAGS)
    kw = dict(train=True, batch_size=3, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=1, world_size=2)
    seen = [[i for _, t in batches(DetLoader(split, (32, 32), rank=r, **kw), 0) for i in t["index"]] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_an_image_that_changed_or_went_missing_is_one_line_from_a_worker(tmp_path):
    d, ann = coco_files(tmp_path, n=4)
    split = read_coco(str(d), str(ann), 3, FLAGS)
    kw = dict(train=False, batch_size=2, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=1)
    Image.new("RGB", (50, 50)).save(d / "im1.png")  # another size than when the run started
    loader = DetLoader(split, (32, 32), num_workers=1, **kw)
    with pytest.raises(ValueError, match=r"image .*im1.png is now 50x50 \(WxH\) but was 44x36 when the run started"):
        batches(loader, 0)
    (d / "im1.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"im1.png"):
        batches(DetLoader(split, (32, 32), num_workers=1, **kw), 0)


def test_pixels_cross_as_uint8_and_are_normalised_on_delivery(tmp_path):
    d, ann = coco_files(tmp_path, n=2)
    split = read_coco(str(d), str(ann), 3, FLAGS)
    loader = DetLoader(split, (32, 32), train=False, batch_size=2, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                       num_classes=1, drop_last=False)
    raw, _ = loader.sample(0)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
    x, _ = batches(loader, 0)[0]
    torch.testing.assert_close(x[0], (raw.float() / 255 - 0.5) / 0.25)


def test_large_jpegs_are_decoded_near_the_size_they_are_used_at(tmp_path):
    """A JPEG shrunk 4x or more on the canvas is decoded at 1/4 by libjpeg (sides divisible by 4), else whole; the
    letterboxed canvas is the full decode's within a few grey levels (DCT-domain vs bilinear reduction)."""
    from fastmae.data.detection import letterbox, letterbox_scale, mean_colour

    yy, xx = np.mgrid[0:240, 0:320]
    pixels = np.stack([xx * 255 // 320, yy * 255 // 240, (xx + yy) % 256], -1).astype(np.uint8)  # smooth
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(pixels[:, :318]).save(tmp_path / "odd.jpg", quality=95)  # 318 wide: no exact 1/4 tiling
    store = dense.ImageStore([tmp_path / "big.jpg", tmp_path / "odd.jpg"], [(240, 320), (240, 318)])
    assert store.reduction(0, 4.5) == 4 and store.reduction(0, 3) == 2 and store.reduction(0, 1.5) == 1
    assert store.reduction(1, 8) == 2  # 318 = 2 x 159
    assert store.load(0, 4).shape == (3, 60, 80) and store.load(0).shape == (3, 240, 320)
    s = letterbox_scale(240, 320, 64, 64)  # 0.2: 5x smaller
    fill = mean_colour((0.5,), 3)
    full = letterbox(store.load(0), (64, 64), s, 0, 0, False, fill)
    reduced = letterbox(store.load(0, store.reduction(0, 1 / s)), (64, 64), s, 0, 0, False, fill, (240, 320))
    assert (full.float() - reduced.float()).abs().mean() < 2.0
