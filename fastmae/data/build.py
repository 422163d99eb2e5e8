"""`build_loader`: a DataConfig and a split -> the Loader of that source (flags were range-checked by config.validate)."""

from __future__ import annotations

from typing import Literal

import torch

from ..config import DataConfig, SourceConfig
from .files import FileLoader
from .loader import Loader
from .memory import MemoryLoader
from .shards import index_shards, shard_urls
from .stream import ShardLoader
from .sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    file_samples,
    load_fashion_mnist,
)

HOLDOUT_SEED = 0  # the held-out samples do not follow --run.seed: every run tunes on the same ones


def has_eval_split(cfg: DataConfig) -> bool:
    """Fashion-MNIST always has its test split; other sources need --data.eval_path or --data.holdout."""
    return cfg.source == "fashion-mnist" or bool(cfg.eval_path) or cfg.holdout > 0


def eval_split_name(cfg: DataConfig) -> str:
    """How results name the split they were scored on: 'evaluation split' or 'N held-out training samples'."""
    return f"{cfg.holdout} held-out training samples" if cfg.holdout else "evaluation split"


def holdout_indices(n: int, holdout: int, split: Literal["train", "eval"]) -> torch.Tensor:
    """Sorted indices of one side of a fixed random split of n training samples: `holdout` of them for "eval",
    the rest for "train". A ValueError naming the flag when nothing would be left to train on."""
    if not 0 < holdout < n:
        raise ValueError(f"--data.holdout {holdout} must be below the {n} training samples (it leaves the rest "
                         f"to train on); pass fewer")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return (perm[:holdout] if split == "eval" else perm[holdout:]).sort().values


def norm_stats(cfg: SourceConfig, channels: int, default_mean: tuple, default_std: tuple) -> tuple[tuple, tuple]:
    """cfg.mean/std if given, else the source's defaults, replicated when they are per grey channel."""
    mean = tuple(cfg.mean) or (default_mean if len(default_mean) == channels else default_mean[:1] * channels)
    std = tuple(cfg.std) or (default_std if len(default_std) == channels else default_std[:1] * channels)
    return mean, std


def source_norm_stats(cfg: SourceConfig, channels: int) -> tuple[tuple, tuple]:
    """Normalisation: --data.mean/std (or the checkpoint's), else Fashion-MNIST's for it, ImageNet's for RGB, 0.5."""
    if cfg.source == "fashion-mnist":
        return norm_stats(cfg, channels, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return norm_stats(cfg, channels, *((IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))))


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
    uint8: bool = True,
) -> Loader:
    """The loader for a split: train=True augments (random resized crop, flip), False resizes and centre-crops.

    drop_last defaults to `train`. uint8 (file and shard sources): workers send 8-bit pixels, normalised where the
    batches are delivered (`Loader.set_device`); False normalises in the workers. With --data.holdout both splits
    come from the training data, disjoint. With world_size > 1 each rank gets a disjoint shard of the epoch. Images
    of any size and aspect ratio work; smaller ones are upscaled by the resize.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    common = dict(
        img_size=tuple(img_size), batch_size=batch_size, train=train, crop_scale=tuple(cfg.crop_scale),
        hflip=cfg.hflip, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
    )
    if cfg.source == "fashion-mnist":
        images, labels = load_fashion_mnist(cfg.path, "train" if cfg.holdout else split)  # (N, 1, 28, 28), (N,)
        if cfg.holdout:
            keep = holdout_indices(len(images), cfg.holdout, split)
            images, labels = images[keep], labels[keep]
        if cfg.limit > 0:
            images, labels = images[: cfg.limit], labels[: cfg.limit]
        channels = cfg.channels or 1
        mean, std = source_norm_stats(cfg, channels)
        num_classes = max(len(FASHION_MNIST_CLASSES), int(labels.max()) + 1 if len(labels) else 0)
        return MemoryLoader(images, labels, channels=channels, mean=mean, std=std, num_classes=num_classes,
                            classes=FASHION_MNIST_CLASSES, **common)
    if cfg.source == "shards":
        return _shard_loader(cfg, split, uint8=uint8, **common)
    samples, classes, num_classes, missing = file_samples(cfg, "train" if cfg.holdout else split)
    if cfg.holdout:
        samples = [samples[i] for i in holdout_indices(len(samples), cfg.holdout, split).tolist()]
    if cfg.limit > 0:
        samples = samples[: cfg.limit]
    channels = cfg.channels or 3
    mean, std = source_norm_stats(cfg, channels)
    loader = FileLoader(samples, channels=channels, mean=mean, std=std, num_workers=cfg.num_workers,
                        skip_corrupt=cfg.skip_corrupt, max_image_pixels=cfg.max_image_pixels,
                        num_classes=num_classes, classes=classes, uint8=uint8, **common)
    loader._note_skipped([(p, "file does not exist") for p in missing])
    return loader


def _shard_loader(cfg: DataConfig, split: str, uint8: bool = True, **common) -> ShardLoader:
    """The split's tar shards (sample counts from sizes.json beside them, else read once)."""
    if cfg.holdout:
        raise ValueError("--data.holdout is not available for --data.source shards (samples are streamed, not "
                         "indexed): write the held-out images to shards of their own and pass --data.eval_path")
    if split == "eval" and not cfg.eval_path:
        raise ValueError("no evaluation data for --data.source shards: pass --data.eval_path with the evaluation "
                         "shards")
    where, flag = (cfg.path, "--data.path") if split == "train" else (cfg.eval_path, "--data.eval_path")
    index = index_shards(shard_urls(where, flag)).limited(cfg.limit)
    channels = cfg.channels or 3
    mean, std = source_norm_stats(cfg, channels)
    common.pop("drop_last", None)  # training batches are always whole, evaluation keeps every sample
    return ShardLoader(index, channels=channels, mean=mean, std=std, num_workers=cfg.num_workers,
                       buffer=cfg.shuffle_buffer, skip_corrupt=cfg.skip_corrupt,
                       max_image_pixels=cfg.max_image_pixels, uint8=uint8, **common)
