"""File and shard workers send 8-bit pixels as uint8 (a quarter of the bytes) and the loader normalises them where
the batches are delivered: the same float32 batches, bit for bit, as normalising in the workers."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fastmae.config import DataConfig
from fastmae.data import build_loader
from fastmae.data.decode import load_image, normalize_uint8
from fastmae.data.loader import stack_images

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(folder, n=12):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30 + i, 26, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_uint8_decode_then_normalize_equals_normalizing_in_the_worker(tmp_path):
    path = _images(tmp_path / "img") / "03.png"
    for train in (True, False):
        kw = dict(img_size=(16, 16), channels=3, mean=MEAN, std=STD, train=train)
        raw = load_image(path, generator=torch.Generator().manual_seed(5), uint8=True, **kw)
        ref = load_image(path, generator=torch.Generator().manual_seed(5), **kw)
        assert raw.dtype == torch.uint8 and raw.shape == (3, 16, 16)
        assert torch.equal(normalize_uint8(raw, MEAN, STD), ref)


def test_file_loader_batches_are_the_same_with_uint8_transport(tmp_path):
    folder = _images(tmp_path / "img")
    cfg = DataConfig(source="unlabelled", path=str(folder), num_workers=1)
    batches = []
    for uint8 in (True, False):
        loader = build_loader(cfg, "train", (16, 16), 4, train=True, seed=2, uint8=uint8)
        loader.set_epoch(1)
        batches.append([x for x, _ in loader])
        loader.close()
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(*batches))
    assert len(batches[0]) == 3


def test_a_batch_mixing_8_bit_and_16_bit_images_is_normalised_whole():
    u8 = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    f32 = torch.randn(3, 4, 4)
    assert stack_images([u8, u8], MEAN, STD).dtype == torch.uint8
    mixed = stack_images([u8, f32], MEAN, STD)
    assert mixed.dtype == torch.float32 and torch.equal(mixed[0], normalize_uint8(u8, MEAN, STD))
    assert torch.equal(mixed[1], f32)
