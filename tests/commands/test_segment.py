"""`fastmae segment`: the feature pyramid, Fashion-MNIST scenes, the folder source and its bad inputs, end to end."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.cli import main
from fastmae.data.segmentation import (
    SCENE_THRESHOLD,
    SegLoader,
    fashion_scenes,
    folder_split,
    make_scenes,
    read_label_map,
)
from fastmae.metrics.segmentation import seg_metrics
from fastmae.models.pyramid import SimpleFeaturePyramid
from fastmae.weights.checkpoint import load_checkpoint
from fastmae.weights.read import read_weights
from tests.helpers.cli import make_fmnist, pretrain_tiny

TINY = ["--model.name", "vit_tiny_patch4", "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2"]
FAST = ["--optim.epochs", "1", "--optim.batch_size", "16", "--run.no_progress", "--run.precision", "fp32"]


def scene_args(data, out, train: int = 48, eval_: int = 16, size: int = 32) -> list[str]:
    return ["--data.path", str(data), "--run.output_dir", str(out), "--seg.train_scenes", str(train),
            "--seg.eval_scenes", str(eval_), "--seg.scene_size", str(size), "--seg.figure_rows", "3", *FAST]


# ---------------------------------------------------------------------------------------------------
# The pyramid.

@pytest.mark.parametrize("dim,h,w,scales,expected", [
    (32, 7, 7, (4.0, 2.0, 1.0, 0.5), [(28, 28), (14, 14), (7, 7), (3, 3)]),
    (48, 21, 21, (4.0, 2.0, 1.0, 0.5), [(84, 84), (42, 42), (21, 21), (10, 10)]),
    (16, 8, 6, (2.0, 1.0, 0.25), [(16, 12), (8, 6), (2, 1)]),
    (8, 4, 4, (8.0,), [(32, 32)]),
])
def test_pyramid_output_shapes(dim, h, w, scales, expected):
    fp = SimpleFeaturePyramid(dim, out_channels=12, scales=scales)
    outs = fp(torch.randn(2, dim, h, w))
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert all(o.shape[:2] == (2, 12) for o in outs)
    assert SimpleFeaturePyramid(dim).stages[0](torch.randn(1, dim, h, w)).shape[1] == 256  # the default width


def test_pyramid_rejects_non_power_of_two_scales():
    with pytest.raises(ValueError, match="powers of two"):
        SimpleFeaturePyramid(16, 8, scales=(3.0, 1.0))


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST scenes.

def write_split(folder, prefix: str, value: int, n: int) -> None:
    """IDX images that are 0 except a 12x12 square of `value`; labels i % 10."""
    imgs = np.zeros((n, 28, 28), np.uint8)
    imgs[:, 8:20, 8:20] = value
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.tobytes())


def test_scenes_deterministic_and_labels_match_pixels():
    g = torch.Generator().manual_seed(0)
    items = torch.randint(0, 256, (50, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,), generator=g)
    a = make_scenes(items, labels, 40, size=56, num_items=(2, 4), seed=3)
    b = make_scenes(items, labels, 40, size=56, num_items=(2, 4), seed=3)
    c = make_scenes(items, labels, 40, size=56, num_items=(2, 4), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    images, masks, sources = a
    assert images.shape == (40, 1, 56, 56) and masks.shape == (40, 56, 56) and images.dtype == torch.uint8
    # a pixel is labelled exactly where some item is brighter than the threshold
    assert torch.equal(images[:, 0] > SCENE_THRESHOLD, masks > 0)
    counts = (sources >= 0).sum(1)
    assert counts.min() >= 2 and counts.max() <= 4
    for s in range(40):  # every label in a scene comes from one of its items
        used = {int(labels[i]) + 1 for i in sources[s] if i >= 0}
        assert set(masks[s].unique().tolist()) - {0} <= used


def test_scene_splits_use_their_own_items(tmp_path):
    write_split(tmp_path, "train", 200, 30)
    write_split(tmp_path, "t10k", 100, 20)
    tr = fashion_scenes(str(tmp_path), "train", 25, 56, (2, 3), seed=0)
    ev = fashion_scenes(str(tmp_path), "eval", 25, 56, (2, 3), seed=0)
    tr_images, ev_images = torch.stack(tr.images.memory), torch.stack(ev.images.memory)
    assert set(tr_images.unique().tolist()) == {0, 200} and set(ev_images.unique().tolist()) == {0, 100}
    assert int(tr.sources.max()) < 30 and int(ev.sources.max()) < 20
    again = fashion_scenes(str(tmp_path), "train", 25, 56, (2, 3), seed=0)
    assert torch.equal(tr_images, torch.stack(again.images.memory))


def test_loader_flips_image_and_label_together(tmp_path):
    write_split(tmp_path, "train", 200, 30)
    split = fashion_scenes(str(tmp_path), "train", 32, 56, (2, 2), seed=1)
    loader = SegLoader(split, train=True, batch_size=32, channels=1, mean=(0.5,), std=(0.5,), hflip=True, seed=0)
    loader.set_epoch(0)
    x, y = next(iter(loader))  # (32, 1, 56, 56), (32, 56, 56)
    assert torch.equal((x[:, 0] * 0.5 + 0.5) * 255 > SCENE_THRESHOLD, y > 0)
    order, _ = loader.sampler.order(0)
    flipped = [not torch.equal(y[i], split.masks[order[i]].long()) for i in range(32)]
    assert 0 < sum(flipped) < 32
    for i in range(32):
        assert torch.equal(y[i], split.masks[order[i]].long().flip(-1) if flipped[i] else split.masks[order[i]].long())


# ---------------------------------------------------------------------------------------------------
# The folder source.

def write_pair(root, name: str, label: np.ndarray, mode: str = "P", size: tuple[int, int] | None = None) -> None:
    """root/images/NAME.jpg (grey, brightness from the label) and root/annotations/NAME.png in `mode`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    h, w = size or label.shape
    Image.fromarray(np.full((h, w), 40, np.uint8)).save(root / "images" / f"{name}.png")
    lbl = Image.fromarray(label.astype(np.uint8), "L")
    if mode == "P":
        lbl = lbl.convert("P")
        lbl.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
    elif mode != "L":
        lbl = lbl.convert(mode)
    lbl.save(root / "annotations" / f"{name}.png")


def labels(h: int = 32, w: int = 32, top: int = 2) -> np.ndarray:
    y = np.zeros((h, w), np.uint8)
    y[4:12, 4:12] = 1
    y[16:24, 8:30] = top
    y[0, :] = 255  # ignored
    return y


def test_palette_and_index_pngs_give_class_indices(tmp_path):
    write_pair(tmp_path, "a", labels(), "P")
    write_pair(tmp_path, "b", labels(top=3), "L")
    assert np.array_equal(read_label_map(tmp_path / "annotations" / "a.png"), labels())
    assert np.array_equal(read_label_map(tmp_path / "annotations" / "b.png"), labels(top=3))
    split = folder_split(str(tmp_path / "images"), str(tmp_path / "annotations"), 1, ("--data.path", "--seg.labels"))
    assert len(split) == 2 and split.size == (32, 32) and split.masks is None  # files, read when a batch needs them
    assert split.images[0].shape == (1, 32, 32) and split.mask(0).shape == (32, 32)
    assert set(torch.cat([split.mask(0), split.mask(1)]).unique().tolist()) == {0, 1, 2, 3, 255}


def test_metrics_ignore_absent_classes():
    conf = torch.tensor([[8, 2, 0], [0, 4, 0], [0, 0, 0]])  # rows label, columns prediction; class 2 absent
    m = seg_metrics(conf, ["a", "b", "c"])
    assert m["per_class_iou"]["a"] == pytest.approx(80.0) and m["per_class_iou"]["b"] == pytest.approx(400 / 6)
    assert m["per_class_iou"]["c"] is None
    assert m["miou"] == pytest.approx((80.0 + 400 / 6) / 2) and m["pixel_acc"] == pytest.approx(100 * 12 / 14)


def folder_args(root, out) -> list[str]:
    return ["segment", "--init", "random", *TINY, "--data.source", "folder", "--data.path", str(root / "images"),
            "--seg.labels", str(root / "annotations"), "--data.eval_path", str(root / "images"),
            "--seg.eval_labels", str(root / "annotations"), "--run.output_dir", str(out), *FAST]


@pytest.mark.parametrize("case,expected", [
    ("size", "label map .*b.png is 16x16 .* its image .*b.png is 32x32"),
    ("range", "label map of .*b.png has value 7 outside the 4 classes .*--seg.num_classes 8"),
    ("missing", "no label map for image .*c.png: expected .*annotations.*c.png"),
    ("patch", "images are 30x30 .* patch size is 4: crop or pad .* 28x28"),
    ("mode", "label map .*b.png is a mode-RGB image; save it as an index PNG"),
])
def test_folder_bad_inputs_are_one_line(tmp_path, capsys, case, expected):
    root = tmp_path / "d"
    size = (30, 30) if case == "patch" else (32, 32)
    write_pair(root, "a", labels(*size), "P")
    if case == "size":
        write_pair(root, "b", labels(16, 16), "P", size=(32, 32))
    elif case == "range":
        y = labels()
        y[30, 30] = 7
        write_pair(root, "b", y, "L")
    elif case == "missing":
        write_pair(root, "b", labels(), "P")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "images" / "c.png")
    elif case == "mode":
        write_pair(root, "b", labels(), "RGB")
    extra = ["--seg.num_classes", "4"] if case == "range" else []
    assert main(folder_args(root, tmp_path / "out") + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmae: error: ") and len(err.splitlines()) == 1
    import re

    assert re.search(expected, err), err


def test_bad_scene_size_names_the_flag(tmp_path, capsys):
    data = make_fmnist(tmp_path)
    assert main(["segment", "--init", "random", *TINY, *scene_args(data, tmp_path / "o", size=30)]) == 2
    assert "--seg.scene_size must be a multiple of 4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# End to end.

def check_result(out, num_classes: int) -> dict:
    res = json.loads((out / "segment.json").read_text())
    assert {"miou", "pixel_acc", "per_class_iou"} <= set(res)
    assert 0 <= res["miou"] <= 100 and 0 <= res["pixel_acc"] <= 100
    assert len(res["per_class_iou"]) == num_classes == len(res["classes"])
    assert all(v is None or 0 <= v <= 100 for v in res["per_class_iou"].values())
    with Image.open(out / "segmentation.png") as fig:
        assert fig.format == "PNG" and fig.height > 3 * 32
    return res


@pytest.mark.parametrize("head", ["linear", "fpn"])
def test_segment_scenes_end_to_end(tmp_path, capsys, head):
    data = make_fmnist(tmp_path)
    out = tmp_path / head
    assert main(["segment", "--init", "random", *TINY, "--head", head, *scene_args(data, out)]) == 0
    res = check_result(out, 11)
    assert res["head"] == head and res["train"] == 48 and res["eval"] == 16 and "background" in res["per_class_iou"]
    assert "mIoU" in capsys.readouterr().out and list(out.glob("checkpoint-*.pt"))


def test_segment_folder_end_to_end(tmp_path):
    root = tmp_path / "d"
    for i in range(4):
        write_pair(root, f"x{i}", labels(top=2 + i % 2), "P")
    assert main(folder_args(root, tmp_path / "out") + ["--optim.batch_size", "4"]) == 0  # 4 images
    res = check_result(tmp_path / "out", 4)
    assert set(res["per_class_iou"]) == {"0", "1", "2", "3"} and res["pixels"] == 4 * 31 * 32  # row 0 ignored


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny 1-epoch MAE run (28x28 images, patch 4): (data folder, run folder)."""
    return pretrain_tiny(tmp_path_factory.mktemp("segpre"))


@pytest.mark.parametrize("finetune", [False, True])
def test_segment_from_pretrained_frozen_or_finetuned(pretrained, tmp_path, finetune):
    data, run = pretrained
    out = tmp_path / "seg"
    args = ["segment", "--init", str(run), *scene_args(data, out)] + (["--finetune"] if finetune else [])
    assert main(args) == 0
    res = check_result(out, 11)
    assert res["finetune"] is finetune and res["image_size"] == [32, 32]  # 7x7 position grid resampled to 8x8
    state, _ = load_checkpoint(sorted(out.glob("checkpoint-*.pt"))[-1])
    enc = read_weights(str(run)).encoder().state_dict
    moved = not torch.equal(state["model"]["encoder.blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"])
    assert moved is finetune
    if finetune:  # the segmenter's encoder is an encoder like any other: fastmae.load, --init of kNN
        import fastmae

        vit = fastmae.load(out)
        assert type(vit).__name__ == "VisionTransformer" and tuple(vit.patch_embed.img_size) == (32, 32)
        assert vit.blocks[0].attn.num_heads == read_weights(str(run)).model_kwargs["num_heads"]  # metadata
        mine = vit.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in
                   ((k[len("encoder."):], v) for k, v in state["model"].items() if k.startswith("encoder.")))
        assert main(["knn", "--init", str(out), "--data.path", str(data), "--run.output_dir", str(tmp_path / "k"),
                     "--run.no_progress", "--run.precision", "fp32"]) == 0
