"""`build_loader`: a DataConfig and a split -> the Loader of that source (flags were range-checked by config.validate)."""

from __future__ import annotations

from typing import Literal

from ..config import DataConfig
from .files import FileLoader
from .loader import Loader
from .memory import MemoryLoader
from .sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    file_samples,
    load_fashion_mnist,
)


def norm_stats(cfg: DataConfig, channels: int, default_mean: tuple, default_std: tuple) -> tuple[tuple, tuple]:
    """cfg.mean/std if given, else the source's defaults, replicated when they are per grey channel."""
    mean = tuple(cfg.mean) or (default_mean if len(default_mean) == channels else default_mean[:1] * channels)
    std = tuple(cfg.std) or (default_std if len(default_std) == channels else default_std[:1] * channels)
    return mean, std


def build_loader(
    cfg: DataConfig,
    split: Literal["train", "eval"],
    img_size: tuple[int, int],
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool | None = None,
) -> Loader:
    """The loader for a split: train=True augments (random resized crop, flip), False resizes and centre-crops.

    drop_last defaults to `train`. With world_size > 1 each rank gets a disjoint shard of the
    epoch. Images of any size and aspect ratio work; smaller ones are upscaled by the resize.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    common = dict(
        img_size=tuple(img_size), batch_size=batch_size, train=train, crop_scale=tuple(cfg.crop_scale),
        hflip=cfg.hflip, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
    )
    if cfg.source == "fashion-mnist":
        images, labels = load_fashion_mnist(cfg.path, split)  # (N, 1, 28, 28), (N,)
        if cfg.limit > 0:
            images, labels = images[: cfg.limit], labels[: cfg.limit]
        channels = cfg.channels or 1
        mean, std = norm_stats(cfg, channels, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        num_classes = max(len(FASHION_MNIST_CLASSES), int(labels.max()) + 1 if len(labels) else 0)
        return MemoryLoader(images, labels, channels=channels, mean=mean, std=std, num_classes=num_classes,
                            classes=FASHION_MNIST_CLASSES, **common)
    samples, classes, num_classes, missing = file_samples(cfg, split)
    if cfg.limit > 0:
        samples = samples[: cfg.limit]
    channels = cfg.channels or 3
    mean, std = norm_stats(cfg, channels, *((IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))))
    loader = FileLoader(samples, channels=channels, mean=mean, std=std, num_workers=cfg.num_workers,
                        skip_corrupt=cfg.skip_corrupt, max_image_pixels=cfg.max_image_pixels,
                        num_classes=num_classes, classes=classes, **common)
    loader._note_skipped([(p, "file does not exist") for p in missing])
    return loader
