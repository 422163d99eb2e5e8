"""Data loading: sources, transforms, crop geometry, determinism, sharding and bad-input errors.

Every test makes its own tiny data under tmp_path (never /usr/share).
"""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fastmae.config import DataConfig, validate
from fastmae.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MemoryLoader,
    build_loader,
    decode_image,
    denormalize,
    holdout_indices,
    normalize,
    read_idx,
    resized_crop,
    sample_crop_box,
    sample_crop_boxes,
)
from fastmae.data import sources as D
from fastmae.data import transforms as T

# ---------------------------------------------------------------------------------------------
# helpers that write tiny data
# ---------------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray) -> None:
    """A correct IDX file (uint8 data), gzipped when path ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def make_fashion(root, n_train=20, n_eval=6, size=28):
    """Fashion-MNIST-shaped IDX files; image i has constant value i and label i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_eval)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, size, size))
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def rgb(w, h, seed=0):
    """A random RGB image of width w and height h."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_folder(root):
    """Class folders (given unsorted) with mixed modes, sizes and extensions."""
    files = {
        "zebra/a.jpg": rgb(40, 30, 1),
        "zebra/sub/b.PNG": rgb(17, 50, 2).convert("RGBA"),
        "apple/c.gif": rgb(30, 30, 3).convert("P"),
        "apple/d.png": Image.fromarray((np.arange(600, dtype=np.uint16) * 100).reshape(20, 30)),  # I;16
        "apple/e.jpeg": Image.new("CMYK", (33, 21), (10, 200, 30, 40)),
        "mango/f.bmp": rgb(64, 20, 4).convert("L"),
        "mango/g.webp": rgb(25, 45, 5),
        "mango/h.tif": rgb(12, 12, 6),
    }
    for name, img in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / name)
    (root / "mango" / "notes.txt").write_text("not an image")
    (root / "mango" / ".hidden.jpg").write_bytes(b"")
    return root


def loader_batches(loader):
    """All (images, labels) of one pass."""
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def memory_loader(n=50, size=12, **kw):
    """A MemoryLoader whose label is the sample index, to check order and sharding."""
    images = torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    args = dict(img_size=(size, size), batch_size=8, train=True, channels=1, mean=(0.5,), std=(0.5,))
    return MemoryLoader(images, torch.arange(n), **{**args, **kw})


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------


def test_read_idx_roundtrip_and_errors(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_idx(tmp_path / "x.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), a)
    write_idx(tmp_path / "raw", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw", magic=2051), a)
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        read_idx(tmp_path / "x.gz", magic=2049)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    full = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(full[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "x.gz").read_bytes()[:20])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "cut.gz")


def test_an_idx_gzip_bomb_is_refused_without_decompressing_it(tmp_path, monkeypatch):
    """A small header followed by 256 MiB of zeros (a .gz of ~250 KB): refused after reading one byte past what
    the header declares, and a header declaring more than MAX_IDX_BYTES is refused before any data is read."""
    import struct

    import fastmae.data.sources as sources

    header = struct.pack(">IIII", 2051, 2, 28, 28)
    with gzip.open(tmp_path / "bomb.gz", "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(16):
            f.write(bytes(16 * 2**20))  # trailing zeros
    read = []
    real = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, n=-1: read.append(n) or real(self, n))
    with pytest.raises(ValueError, match=r"bomb.gz: IDX data is more than 1568 bytes, the header says 1568 \(trailing"):
        read_idx(tmp_path / "bomb.gz")
    assert -1 not in read and sum(read) < 4096
    monkeypatch.setattr(sources, "MAX_IDX_BYTES", 1000)
    with pytest.raises(ValueError, match=r"declares \(2, 28, 28\) .* more than"):
        read_idx(tmp_path / "bomb.gz")


def is_fallback(box, height, width) -> bool:
    return tuple(box) == T._fallback_box(height, width, T.CROP_RATIO)


@settings(deadline=None, max_examples=60)
@given(
    height=st.integers(1, 400),
    width=st.integers(1, 400),
    lo=st.floats(0.05, 1.0),
    span=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_crop_boxes_inside_and_area_in_scale(height, width, lo, span, seed):
    scale = (lo, lo + (1.0 - lo) * span)
    g = torch.Generator().manual_seed(seed)
    boxes = [sample_crop_box(height, width, scale, T.CROP_RATIO, g)]
    boxes += sample_crop_boxes(32, height, width, scale, T.CROP_RATIO, g).tolist()
    area = height * width
    for top, left, h, w in boxes:
        assert h >= 1 and w >= 1 and top >= 0 and left >= 0
        assert top + h <= height and left + w <= width
        if not is_fallback((top, left, h, w), height, width):
            slack = 0.5 * (h + w) + 1  # w and h are rounded from the real-valued target
            assert scale[0] * area - slack <= h * w <= scale[1] * area + slack


def test_crop_boxes_cover_the_scale_range():
    boxes = sample_crop_boxes(4000, 224, 224, (0.2, 1.0), T.CROP_RATIO, torch.Generator().manual_seed(0))
    frac = (boxes[:, 2] * boxes[:, 3]).float() / 224**2
    assert frac.min() < 0.25 and frac.max() > 0.9
    ratio = boxes[:, 3].float() / boxes[:, 2].float()
    assert ratio.min() > 0.7 and ratio.max() < 1.4


def test_resized_crop_matches_pillow_bicubic():
    a = np.random.default_rng(0).random((37, 53)).astype(np.float32)
    for box, (H, W) in [((3.5, 2.25, 20.7, 31.1), (24, 16)), ((0, 0, 37, 53), (10, 12)), ((5, 7, 9, 11), (30, 40))]:
        top, left, h, w = box
        ref = Image.fromarray(a).resize((W, H), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        out = resized_crop(torch.from_numpy(a)[None, None], torch.tensor([box]), (H, W))  # (1, 1, H, W)
        np.testing.assert_allclose(out[0, 0].numpy(), np.clip(np.asarray(ref), 0, 1), atol=1e-5)


def test_normalize_and_denormalize_are_inverse():
    x = torch.rand(2, 3, 4, 5)
    y = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(y[:, 1], (x[:, 1] - 0.456) / 0.224)
    assert torch.allclose(denormalize(y, IMAGENET_MEAN, IMAGENET_STD), x, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# in-memory loader
# ---------------------------------------------------------------------------------------------


def test_fashion_mnist_source(tmp_path):
    cfg = DataConfig(path=str(make_fashion(tmp_path / "fm")))
    train = build_loader(cfg, "train", (28, 28), batch_size=8, train=True)
    assert (len(train), train.num_samples, train.num_classes, train.channels) == (2, 20, 10, 1)
    assert (train.mean, train.std) == (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    x, y = next(iter(train))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    ev = build_loader(cfg, "eval", (28, 28), batch_size=4, train=False)
    assert (ev.num_samples, len(ev)) == (6, 2)
    xs, ys = zip(*ev)
    pixels = denormalize(torch.cat(xs), ev.mean, ev.std)
    values = torch.arange(6).float() / 255
    assert torch.allclose(pixels, values[:, None, None, None].expand(6, 1, 28, 28), atol=1e-6)  # eval = identity
    assert torch.equal(torch.cat(ys), torch.arange(6))
    rgb32 = build_loader(DataConfig(path=cfg.path, channels=3, limit=5), "train", (32, 32), batch_size=5, train=True)
    x, _ = next(iter(rgb32))
    assert x.shape == (5, 3, 32, 32) and rgb32.num_samples == 5 and len(rgb32.mean) == 3
    assert torch.equal(x[:, 0], x[:, 2])  # grey replicated


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist.*--data\.path DIR"):
        build_loader(DataConfig(path=str(tmp_path)), "train", (28, 28), batch_size=4, train=True)
    make_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((3, 2)))  # 2-D: magic 2050
    with pytest.raises(ValueError, match="expected 2049"):
        build_loader(DataConfig(path=str(tmp_path)), "eval", (28, 28), batch_size=4, train=False)


def test_eval_of_image_already_img_size_is_identity():
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    ld = MemoryLoader(images, torch.zeros(10), img_size=(28, 28), batch_size=10, train=False,
                      channels=1, mean=(0.3,), std=(0.2,))
    x, _ = next(iter(ld))
    assert torch.allclose(denormalize(x, ld.mean, ld.std), images.float() / 255, atol=1e-6)


def test_eval_resizes_then_centre_crops():
    ramp = torch.arange(40, dtype=torch.uint8).repeat(40, 1)[None, None] * 6  # (1, 1, 40, 40), x ramp
    ld = MemoryLoader(ramp, torch.zeros(1), img_size=(20, 20), batch_size=1, train=False,
                      channels=1, mean=(0.0,), std=(1.0,))
    x, _ = next(iter(ld))
    assert x.shape == (1, 1, 20, 20)
    row = x[0, 0, 10] * 255 / 6  # source column sampled by each output column
    # 40 -> 20 / 0.875 ~ 22.9 wide, centre crop 20: the central 35 source columns, i.e. 2.5 .. 37.5
    assert 2.0 < row[0] < 4.5 and 35.5 < row[-1] < 38.0 and bool((row.diff() > 0).all())


def test_flip_happens_about_half_the_time():
    ramp = torch.arange(16, dtype=torch.uint8).repeat(16, 1) * 15  # (16, 16) increasing to the right
    images = ramp[None, None].repeat(400, 1, 1, 1)
    args = dict(img_size=(16, 16), batch_size=400, train=True, channels=1, mean=(0.0,), std=(1.0,))
    x, _ = next(iter(MemoryLoader(images, torch.zeros(400), **args)))
    flipped = (x[:, 0, :, -1] < x[:, 0, :, 0]).all(1).float().mean()
    assert 0.4 < flipped < 0.6
    x, _ = next(iter(MemoryLoader(images, torch.zeros(400), hflip=False, **args)))
    assert bool((x[:, 0, :, -1] > x[:, 0, :, 0]).all())


def test_epochs_are_reproducible_and_resumable():
    ld = memory_loader()
    ld.set_epoch(3)
    a = loader_batches(ld)
    ld.set_epoch(3)
    assert same(a, loader_batches(ld))
    ld.set_epoch(4)
    assert not same(a, loader_batches(ld))
    ld.set_epoch(3, start_batch=2)
    assert same(a[2:], loader_batches(ld))
    fresh = memory_loader()  # a new process resuming: same seed, same batches
    fresh.set_epoch(3, start_batch=4)
    assert same(a[4:], loader_batches(fresh))
    with pytest.raises(ValueError, match="start_batch"):
        ld.set_epoch(0, start_batch=len(ld) + 1)


@pytest.mark.parametrize("n", [50, 51])
def test_world_size_two_gives_disjoint_covering_shards(n):
    shards = []
    for rank in range(2):
        ld = memory_loader(n=n, rank=rank, world_size=2, train=False)
        ld.set_epoch(1)
        shards.append(torch.cat([y for _, y in ld]).tolist())
    assert len(shards[0]) == len(shards[1]) == math.ceil(n / 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == (n % 2)  # only the padding repeats a sample
    trains = [memory_loader(n=n, rank=r, world_size=2) for r in range(2)]  # shuffled, drop_last
    ys = [torch.cat([y for _, y in t]).tolist() for t in trains]
    assert len(trains[0]) == math.ceil(n / 2) // 8 and not set(ys[0]) & set(ys[1])


def test_drop_last_and_len():
    assert len(memory_loader(n=50, batch_size=8)) == 6  # train: drop_last
    ld = memory_loader(n=50, batch_size=8, train=False)
    assert len(ld) == 7 and [len(y) for _, y in ld][-1] == 2
    assert len(memory_loader(n=5, batch_size=8)) == 1  # fewer samples than a batch: keep them


# ---------------------------------------------------------------------------------------------
# file sources
# ---------------------------------------------------------------------------------------------


def test_holdout_takes_a_fixed_disjoint_eval_split_from_train(tmp_path):
    cfg = DataConfig(path=str(make_fashion(tmp_path / "fm")), holdout=5)
    values = {}
    for split in ("train", "eval"):
        ld = build_loader(cfg, split, (28, 28), batch_size=20, train=False)
        xs, ys = zip(*ld)
        pixels = denormalize(torch.cat(xs), ld.mean, ld.std)[:, 0, 0, 0]
        values[split] = (pixels * 255).round().long()  # image i has value i (label i % 10)
        assert torch.equal(torch.cat(ys), values[split] % 10)
    assert (len(values["train"]), len(values["eval"])) == (15, 5)  # the t10k images are not used
    assert sorted(values["train"].tolist() + values["eval"].tolist()) == list(range(20))
    assert torch.equal(holdout_indices(20, 5, "eval"), values["eval"])  # same choice whatever --run.seed
    assert not torch.equal(holdout_indices(20, 5, "eval"), torch.arange(15, 20))  # random, not the last ones
    root = make_folder(tmp_path / "train")  # files: the held-out ones are among the training files
    ev = build_loader(DataConfig(source="folder", path=str(root), num_workers=0, holdout=3), "eval", (8, 8), 8,
                      train=False)
    assert ev.num_samples == 3 and ev.num_classes == 3
    with pytest.raises(ValueError, match="--data.holdout 20 must be below the 20 training samples"):
        build_loader(DataConfig(path=cfg.path, holdout=20), "train", (28, 28), 4, train=True)
    with pytest.raises(ValueError, match="pass one of the two"):
        validate(DataConfig(source="folder", path="a", eval_path="b", holdout=3))
    with pytest.raises(ValueError, match=r"--holdout must be >= 0"):
        validate(DataConfig(holdout=-1))


def test_folder_source_modes_sizes_and_sorted_classes(tmp_path):
    root = make_folder(tmp_path / "train")
    cfg = DataConfig(source="folder", path=str(root), num_workers=0)
    ld = build_loader(cfg, "train", (16, 16), batch_size=3, train=True)
    assert ld.classes == ["apple", "mango", "zebra"] and ld.num_classes == 3
    assert ld.num_samples == 8 and ld.channels == 3 and (ld.mean, ld.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert len(ld) == 2  # 8 // 3, drop_last in training
    ev = build_loader(DataConfig(**{**cfg.__dict__, "eval_path": str(root)}), "eval", (16, 16), 3, train=False)
    xs, ys = zip(*ev)
    assert [len(y) for y in ys] == [3, 3, 2]
    x = torch.cat(xs)
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.cat(ys).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # apple c d e, mango f g h, zebra a b
    grey = build_loader(DataConfig(**{**cfg.__dict__, "channels": 1}), "train", (8, 12), batch_size=8, train=True)
    x, _ = next(iter(grey))
    assert x.shape == (8, 1, 8, 12) and grey.mean == (0.5,)


def test_eval_classes_follow_the_training_folder(tmp_path):
    make_folder(tmp_path / "train")
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    rgb(20, 20).save(tmp_path / "val" / "zebra" / "z.png")
    cfg = DataConfig(source="folder", path=str(tmp_path / "train"), eval_path=str(tmp_path / "val"), num_workers=0)
    ev = build_loader(cfg, "eval", (16, 16), batch_size=4, train=False)
    assert ev.num_classes == 3 and [y.tolist() for _, y in ev] == [[2]]


def test_unlabelled_source_is_recursive(tmp_path):
    root = tmp_path / "u"
    for i, name in enumerate(["a.JPG", "x/b.png", "x/y/z/c.tiff", "d.ppm", "e.pgm"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img = rgb(10 + 5 * i, 30 - 3 * i, i)
        (img.convert("L") if name.endswith(".pgm") else img).save(root / name)
    ld = build_loader(DataConfig(source="unlabelled", path=str(root), num_workers=0), "train", (8, 8), 5, train=True)
    x, y = next(iter(ld))
    assert x.shape == (5, 3, 8, 8) and y.tolist() == [-1] * 5 and ld.num_classes == 0


def test_list_source(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        rgb(12 + i, 9, i).save(tmp_path / "imgs" / f"{i}.png")
    rgb(8, 8).save(tmp_path / "abs image.png")
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    absolute = tmp_path / "abs image.png"  # absolute path with a space in it
    lines = ["# comment", "../imgs/0.png 2", "", "  ../imgs/1.png\t0", "../imgs/2.png 1", f"{absolute} 5"]
    lst.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="list", path=str(lst), num_workers=0)
    ld = build_loader(cfg, "train", (8, 8), batch_size=4, train=False)
    assert ld.num_classes == 6 and [y.tolist() for _, y in ld] == [[2, 0, 1, 5]]
    lst.write_text("../imgs/0.png\n../imgs/1.png\n")
    ld = build_loader(cfg, "train", (8, 8), batch_size=4, train=False)
    assert ld.num_classes == 0 and [y.tolist() for _, y in ld] == [[-1, -1]]
    lst.write_text("../imgs/0.png 1\n../imgs/1.png\n")
    with pytest.raises(ValueError, match=r"train.txt:2: no label"):
        build_loader(cfg, "train", (8, 8), batch_size=4, train=False)
    lst.write_text("../imgs/0.png 1\n../imgs/missing.png 0\n")
    with pytest.raises(FileNotFoundError, match=r"missing.png.*--data.skip_corrupt"):
        build_loader(cfg, "train", (8, 8), batch_size=4, train=False)
    ld = build_loader(DataConfig(**{**cfg.__dict__, "skip_corrupt": True}), "train", (8, 8), 4, train=False)
    assert ld.num_samples == 1 and ld.skipped[0].endswith("missing.png")


def test_decode_modes_16_bit_exif_and_channels(tmp_path):
    Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)).save(tmp_path / "half.png")  # I;16
    for c in (1, 3):
        x = decode_image(tmp_path / "half.png", c)
        assert x.shape == (c, 4, 6) and torch.allclose(x, torch.tensor(32768 / 65535))  # scaled, not clipped
    Image.new("RGBA", (5, 3), (255, 0, 0, 10)).save(tmp_path / "rgba.png")
    assert torch.allclose(decode_image(tmp_path / "rgba.png", 3)[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert decode_image(tmp_path / "rgba.png", 4).shape == (4, 3, 5)  # 4 channels: the image's own bands
    assert decode_image(tmp_path / "rgba.png", 1).shape == (1, 3, 5)
    pages = [Image.fromarray(np.full((6, 7), v, dtype=np.uint8)) for v in (10, 200)]
    pages[0].save(tmp_path / "two.tif", save_all=True, append_images=pages[1:])
    x = decode_image(tmp_path / "two.tif", 2)
    assert x.shape == (2, 6, 7) and torch.allclose(x[:, 0, 0], torch.tensor([10 / 255, 200 / 255]))
    with pytest.raises(ValueError, match=r"rgba.png.*expects 2 channels"):
        decode_image(tmp_path / "rgba.png", 2)
    img = rgb(40, 20)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert decode_image(tmp_path / "rot.jpg", 3).shape == (3, 40, 20)  # height 40, width 20 after EXIF


def test_file_eval_of_image_already_img_size_is_identity(tmp_path):
    (tmp_path / "c").mkdir()
    a = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "c" / "x.png")
    cfg = DataConfig(source="folder", path=str(tmp_path), eval_path=str(tmp_path), channels=1, num_workers=0)
    ld = build_loader(cfg, "eval", (28, 28), batch_size=1, train=False)
    x, y = next(iter(ld))
    assert torch.allclose(denormalize(x, ld.mean, ld.std)[0, 0], torch.from_numpy(a).float() / 255, atol=1e-6)


def test_file_loader_deterministic_with_workers_and_resume(tmp_path):
    root = make_folder(tmp_path / "train")
    cfg = DataConfig(source="folder", path=str(root), num_workers=0)
    ld = build_loader(cfg, "train", (16, 16), batch_size=2, train=True, seed=7)
    ld.set_epoch(5)
    a = loader_batches(ld)
    ld.set_epoch(6)
    assert not same(a, loader_batches(ld))
    workers = build_loader(DataConfig(**{**cfg.__dict__, "num_workers": 2}), "train", (16, 16), 2, train=True, seed=7)
    workers.set_epoch(5)
    assert same(a, loader_batches(workers))
    workers.set_epoch(5, start_batch=1)
    assert same(a[1:], loader_batches(workers))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["folder", "unlabelled", "list"])
def test_missing_path(tmp_path, source):
    with pytest.raises(FileNotFoundError, match=r"nope.*--data\.path"):
        build_loader(DataConfig(source=source, path=str(tmp_path / "nope")), "train", (8, 8), 2, train=True)


def test_empty_folders_and_missing_eval_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images found under .*empty.*\.jpg"):
        build_loader(DataConfig(source="unlabelled", path=str(tmp_path / "empty")), "train", (8, 8), 2, train=True)
    with pytest.raises(ValueError, match="no class subfolders.*--data.source unlabelled"):
        build_loader(DataConfig(source="folder", path=str(tmp_path / "empty")), "train", (8, 8), 2, train=True)
    root = make_folder(tmp_path / "f")
    (root / "lemon" / "deep").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folder .*lemon contains no images"):
        build_loader(DataConfig(source="folder", path=str(root)), "train", (8, 8), 2, train=True)
    with pytest.raises(ValueError, match=r"--data\.eval_path"):
        build_loader(DataConfig(source="folder", path=str(root)), "eval", (8, 8), 2, train=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        build_loader(DataConfig(source="unlabelled", path=str(tmp_path / "file.txt")), "train", (8, 8), 2, True)


def test_unreadable_folder(tmp_path, monkeypatch):
    make_folder(tmp_path / "f")
    monkeypatch.setattr(D.os, "access", lambda *a, **k: False)  # tests may run as root, which reads anything
    with pytest.raises(PermissionError, match=r"cannot read folder .*f \(permission denied\)"):
        build_loader(DataConfig(source="folder", path=str(tmp_path / "f")), "train", (8, 8), 2, train=True)


def test_bad_norm_and_channels(tmp_path):
    root = make_folder(tmp_path / "f")
    with pytest.raises(ValueError, match=r"--data\.mean has 1 values but the model takes 3"):
        build_loader(DataConfig(source="folder", path=str(root), mean=(0.5,), std=(0.5,)), "train", (8, 8), 2, True)
    cfg = DataConfig(source="folder", path=str(root), mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0), num_workers=0)
    assert build_loader(cfg, "train", (8, 8), 2, True).mean == (0.1, 0.2, 0.3)
    cfg4 = DataConfig(source="unlabelled", path=str(root / "zebra"), channels=4, num_workers=0)
    with pytest.raises(ValueError, match=r"a\.jpg.*expects 4 channels"):
        next(iter(build_loader(cfg4, "train", (8, 8), 2, train=False)))
    with pytest.raises(ValueError, match=r"--data\.crop_scale must be \(min, max\)"):  # checked once, up front
        validate(DataConfig(crop_scale=(0.5, 0.2)), "--data.")


def corrupt_tree(root):
    """Five good images and three bad ones: empty, truncated, text named .jpg."""
    root.mkdir()
    for i in range(5):
        rgb(20, 16, i).save(root / f"good{i}.png")
    (root / "empty.jpg").write_bytes(b"")
    rgb(64, 64).save(root / "full.jpg")
    (root / "cut.jpg").write_bytes((root / "full.jpg").read_bytes()[:300])
    (root / "full.jpg").unlink()
    (root / "text.jpg").write_text("hello, I am not a JPEG")
    return root


def test_corrupt_files_raise_by_default(tmp_path):
    cfg = DataConfig(source="unlabelled", path=str(corrupt_tree(tmp_path / "c")), num_workers=0)
    with pytest.raises(ValueError, match=r"cannot read image .*(cut|empty|text)\.jpg.*--data\.skip_corrupt"):
        list(build_loader(cfg, "train", (8, 8), 8, train=False))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_corrupt_skips_and_records(tmp_path, workers):
    root = corrupt_tree(tmp_path / "c")
    cfg = DataConfig(source="unlabelled", path=str(root), skip_corrupt=True, num_workers=workers)
    ld = build_loader(cfg, "train", (8, 8), batch_size=4, train=False)
    batches = loader_batches(ld)
    assert sum(len(y) for _, y in batches) == 8 and all(torch.isfinite(x).all() for x, _ in batches)
    assert sorted(p.rsplit("/", 1)[1] for p in ld.skipped) == ["cut.jpg", "empty.jpg", "text.jpg"]
    again = loader_batches(ld)  # known-bad files are not reported twice, and substitutes are stable
    assert len(ld.skipped) == 3 and same(batches, again)


def test_one_crop_box_is_the_batched_rule_with_the_same_draws():
    """sample_crop_box (Python arithmetic, per file) gives sample_crop_boxes(1)'s box and leaves the generator alike."""
    rnd = np.random.default_rng(0)
    for seed in range(400):
        height, width = (int(v) for v in rnd.integers(1, 700, 2))
        scale = (float(rnd.uniform(0.02, 1.0)), 1.0)
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        one = sample_crop_box(height, width, scale, T.CROP_RATIO, g1)
        assert one == tuple(sample_crop_boxes(1, height, width, scale, T.CROP_RATIO, g2)[0].tolist())
        assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize(("mode", "mean", "std"), [("RGB", IMAGENET_MEAN, IMAGENET_STD), ("L", (0.286,), (0.353,)),
                                                   ("RGB", (0.5,), (0.25,))])
def test_file_normalisation_equals_normalize_of_the_pixels(mode, mean, std):
    from fastmae.data.decode import _normalized, _planes_to_tensor

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
    pixels = torch.from_numpy(np.array(img)).float().div(255)  # (h, w[, 3])
    pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    assert torch.equal(_planes_to_tensor([img]), pixels)
    torch.testing.assert_close(_normalized([img], mean, std), normalize(pixels, mean, std), rtol=1e-6, atol=1e-5)


def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path):
    """Issue #29: a FIFO among the images hung the loader (Pillow's open blocks until a writer comes)."""
    import os

    from fastmae.data import UnreadableImageError, decode_image

    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableImageError, match="not a regular file") as e:
        decode_image(fifo, 3)
    assert e.value.reason == "not a regular file"


def test_a_float_image_with_a_nan_pixel_is_named(tmp_path):
    """Issue #29: a float TIFF with one NaN pixel gave a NaN feature row that kNN scored (exit 0)."""
    from PIL import Image

    from fastmae.data import UnreadableImageError, decode_image

    a = np.full((8, 8), 0.5, dtype=np.float32)
    a[2, 3] = np.nan
    Image.fromarray(a).save(tmp_path / "nan.tif")
    with pytest.raises(UnreadableImageError, match=r"nan.tif: 1 pixel NaN or infinite"):
        decode_image(tmp_path / "nan.tif", 1)
    a[2, 3] = 0.25
    Image.fromarray(a).save(tmp_path / "ok.tif")
    assert decode_image(tmp_path / "ok.tif", 1).shape == (1, 8, 8)
