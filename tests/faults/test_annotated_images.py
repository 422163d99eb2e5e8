"""Images whose annotations live in their pixels (segment's label maps, detect's boxes, pose's keypoints): the
frame they are read in (EXIF orientation), sizes checked before decoding, and one line for every bad file."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fastmae.cli import main
from fastmae.data.decode import UnreadableImageError, decode_annotated
from fastmae.data.detection import read_coco
from fastmae.data.pose import read_coco_keypoints
from fastmae.data.segmentation import (
    SegLoader,
    check_labels,
    folder_split,
    read_label_map,
)

FLAGS = ("--data.path", "--seg.labels")


def stored_pixels(h: int, w: int) -> np.ndarray:
    """A grey image with a distinct value at every pixel, so a turn or flip is visible exactly."""
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 7 % 251).astype(np.uint8)


def save_turned(path, pixels: np.ndarray, orientation: int) -> None:
    """A lossless PNG of `pixels` (the stored frame) tagged with an EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def label_png(path, hw: tuple[int, int], value: int = 1) -> None:
    y = np.zeros(hw, np.uint8)
    y[: hw[0] // 2] = value
    Image.fromarray(y, "L").save(path)


def seg_folder(root, names_hw: dict[str, tuple[int, int]], orientation: int = 6, label_hw=None):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, hw in names_hw.items():
        save_turned(root / "images" / f"{name}.png", stored_pixels(*hw), orientation)
        label_png(root / "labels" / f"{name}.png", label_hw or hw)
    return str(root / "images"), str(root / "labels")


def test_exif_turned_image_with_labels_on_its_stored_pixels_is_refused_naming_the_flag(tmp_path):
    images, labels = seg_folder(tmp_path, {"a": (16, 24)})  # stored 24x16 (WxH); upright 16x24
    with pytest.raises(ValueError, match=r"label map .*a.png is 24x16 \(WxH\) but its image .*a.png is 16x24; .*EXIF "
                                         r"orientation 6.*--data.no_apply_exif_orientation"):
        folder_split(images, labels, 1, FLAGS)
    split = folder_split(images, labels, 1, FLAGS, upright=False)  # the stored pixels, as the label maps
    assert torch.equal(split.images[0][0], torch.from_numpy(stored_pixels(16, 24)))


def test_exif_turned_images_are_upright_by_default_and_it_is_said(tmp_path, caplog):
    images, labels = seg_folder(tmp_path, {"a": (16, 16), "b": (16, 16)}, orientation=3)  # 180 degrees: same size
    with caplog.at_level(logging.WARNING):
        split = folder_split(images, labels, 1, FLAGS)
    assert torch.equal(split.images[0][0], torch.from_numpy(stored_pixels(16, 16)).flip(0, 1))
    assert "2 of 2 images" in caplog.text and "--data.no_apply_exif_orientation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        split = folder_split(images, labels, 1, FLAGS, upright=False)
    assert torch.equal(split.images[0][0], torch.from_numpy(stored_pixels(16, 16)))
    assert "EXIF" not in caplog.text


def test_segment_cli_takes_the_frame_and_pixel_limit_flags(tmp_path, capsys):
    images, labels = seg_folder(tmp_path / "d", {"a": (16, 24), "b": (16, 24)})
    base = ["segment", "--init", "random", "--model.name", "vit_tiny_patch8", "--model.embed_dim", "16", "--model.depth", "1",
            "--model.num_heads", "2", "--data.source", "folder", "--data.path", images, "--seg.labels", labels,
            "--data.eval_path", images, "--seg.eval_labels", labels, "--optim.epochs", "1", "--optim.batch_size", "2",
            "--run.no_progress", "--seg.figure_rows", "1"]
    assert main(base + ["--run.output_dir", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data.no_apply_exif_orientation" in err
    assert main(base + ["--run.output_dir", str(tmp_path / "o2"), "--data.max_image_pixels", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exceeds the limit of 100 pixels" in err and "skip_corrupt" not in err
    assert main(base + ["--run.output_dir", str(tmp_path / "o3"), "--data.no_apply_exif_orientation"]) == 0
    assert json.loads((tmp_path / "o3" / "config.json").read_text())["data"]["apply_exif_orientation"] is False


def test_a_huge_label_map_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(stored_pixels(16, 16)).save(tmp_path / "images" / "a.png")
    Image.new("L", (4000, 3000)).save(tmp_path / "labels" / "a.png")  # 12 Mpx, a few KB compressed
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # even over Pillow's own bomb limit: the header is enough
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    with pytest.raises(ValueError, match=r"label map .*a.png is 4000x3000 \(WxH\) but its image .*a.png is 16x16"):
        folder_split(str(tmp_path / "images"), str(tmp_path / "labels"), 1, FLAGS, max_image_pixels=10_000)
    assert (4000, 3000) not in decoded  # the image was decoded, the label map never was


@pytest.mark.parametrize("content,expected", [
    ("truncated", "cannot read label map .*a.png: .*truncated.*; save it again as a PNG"),
    ("text", "cannot read label map .*a.png: not an image in a format Pillow reads; save it again"),
])
def test_unreadable_label_maps_are_one_line(tmp_path, content, expected):
    images, labels = seg_folder(tmp_path, {"a": (16, 16)}, orientation=1)
    path = tmp_path / "labels" / "a.png"
    if content == "truncated":
        Image.fromarray(stored_pixels(16, 16)).save(path)  # incompressible rows: cutting the file cuts pixel data
        path.write_bytes(path.read_bytes()[:-60])
    else:
        path.write_text("not a png\n")
    with pytest.raises(ValueError, match=expected):
        read_label_map(path, (16, 16))
    with pytest.raises(ValueError, match=expected):
        split = folder_split(images, labels, 1, FLAGS)  # a text file is refused by its header, here
        check_labels(split, 2, 255)  # a truncated one when its pixels are first read (segment reads each map once)
    if content == "truncated":  # read by a loader worker: the same one line reaches the main process
        split = folder_split(images, labels, 1, FLAGS)
        loader = SegLoader(split, train=True, batch_size=1, channels=1, mean=(0.5,), std=(0.5,), num_workers=1)
        with pytest.raises(ValueError, match=expected):
            next(iter(loader))
        loader.close()


def test_dense_readers_never_suggest_skipping_a_file(tmp_path):
    bad = tmp_path / "a.png"
    bad.write_bytes(b"")
    with pytest.raises(UnreadableImageError) as e:
        decode_annotated(bad, 1)
    assert "the file is empty" in str(e.value) and "skip_corrupt" not in str(e.value)


def coco_files(root, orientation: int, stated: str, keypoints: bool = False):
    """One 24x16 (WxH, stored) image tagged with an EXIF orientation, its entry stating the stored or upright size."""
    root.mkdir()
    save_turned(root / "a.png", np.stack([stored_pixels(16, 24)] * 3, -1), orientation)
    w, h = (24, 16) if stated == "stored" else (16, 24)
    ann = {"id": 1, "image_id": 5, "category_id": 3, "bbox": [1.0, 1.0, 8.0, 8.0], "area": 64.0, "iscrowd": 0}
    cat = {"id": 3, "name": "thing"}
    if keypoints:
        ann |= {"keypoints": [2.0, 2.0, 2, 5.0, 5.0, 2], "num_keypoints": 2}
        cat |= {"keypoints": ["left_end", "right_end"], "skeleton": [[1, 2]]}
    path = root / "ann.json"
    path.write_text(json.dumps({"images": [{"id": 5, "file_name": "a.png", "width": w, "height": h}],
                                "annotations": [ann], "categories": [cat]}))
    return str(root), str(path)


@pytest.mark.parametrize("keypoints", [False, True])
def test_coco_entry_sizes_are_checked_in_the_frame_read(tmp_path, keypoints):
    read = read_coco_keypoints if keypoints else read_coco
    flags = ("--data.path", "--pose.annotations" if keypoints else "--det.annotations")
    root, ann = coco_files(tmp_path / "stored", 6, "stored", keypoints)
    with pytest.raises(ValueError, match=r"ann.json: image .*a.png \(id 5\) is 16x24 \(WxH\), but its entry says 24x16; "
                                         r"fix the entry's width and height.*--data.no_apply_exif_orientation"):
        read(root, ann, 3, flags)
    split = read(root, ann, 3, flags, upright=False)
    assert tuple(split.images[0].shape) == (3, 16, 24)
    root, ann = coco_files(tmp_path / "upright", 6, "upright", keypoints)
    assert tuple(read(root, ann, 3, flags).images[0].shape) == (3, 24, 16)
    with pytest.raises(ValueError, match=r"is 24x16 \(WxH\), but its entry says 16x24.*drop that flag"):
        read(root, ann, 3, flags, upright=False)
