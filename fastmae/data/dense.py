"""Dense-task images read where a sample is made: a split's `ImageStore` (files, or generated scenes in memory) and
`DenseLoader`, whose DataLoader workers decode, place and augment each sample and send it as uint8.

Shapes: N images, C0 an image's own channels, C the model's, h, w an image's own size, H, W the sample's (canvas,
crop or the image itself), B batch.

Memory does not grow with the data set: a split holds file paths, sizes (from the annotations or the file headers,
never a full decode) and annotations; a worker decodes an image when a sample needs it. Each sample's augmentation
comes from a seed the main process draws from (seed, epoch, position), so the batches of an epoch do not depend on
the number of workers and a resumed epoch replays exactly (as `files.FileLoader`). 8-bit pixels cross from the
workers as uint8 and are normalised on the device the batch is delivered to (`Loader.deliver`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import UnreadableImageError, decode_image_uint8, image_header, oriented_hw
from .files import worker_loader
from .loader import SampledLoader
from .sampler import AUGMENT_STREAM, EpochSampler, mix_seed

log = logging.getLogger(__name__)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] (any shape) -> uint8, rounded."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


class ImageStore:
    """The images of a dense split, loaded one at a time: files decoded on demand, or uint8 tensors in memory.

    files: one path per image; sizes: each image's (h, w) as decoded (the frame its annotations are in), known
    before any decode; memory: (C0, h, w) uint8 images of a generated split instead of files. `load(i)` decodes
    file i (to `channels`, with the pixel limit and EXIF frame of the split) and checks it still has the size it
    was listed with.
    """

    def __init__(self, files: Sequence[str] = (), sizes: Sequence[tuple[int, int]] = (), *,
                 memory: Sequence[torch.Tensor] | None = None, channels: int = 3, max_image_pixels: int = 0,
                 upright: bool = True):
        if memory is not None:
            self.files = [""] * len(memory)
            self.sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in memory]
        else:
            if len(files) != len(sizes):
                raise ValueError(f"{len(files)} files but {len(sizes)} sizes")
            self.files, self.sizes = [str(f) for f in files], [(int(h), int(w)) for h, w in sizes]
        self.memory = None if memory is None else list(memory)
        self.channels, self.max_image_pixels, self.upright = channels, max_image_pixels, upright

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(i)

    def hw(self, i: int) -> tuple[int, int]:
        """Image i's (h, w), without decoding it."""
        return self.sizes[i]

    def reduction(self, i: int, most: float) -> int:
        """The JPEG reduction (8, 4 or 2, else 1) at which image i may be decoded for a use that shrinks it by
        `most` or more: one that divides both sides (so reduced pixels tile the image exactly). 1 in memory."""
        if self.memory is not None:
            return 1
        h, w = self.sizes[i]
        return next((s for s in (8, 4, 2) if s <= most and h % s == 0 and w % s == 0), 1)

    def load(self, i: int, reduce: int = 1, channels: int = 0) -> torch.Tensor:
        """Image i as (C0, h, w) uint8 (C0 = `channels`, else the store's, for files). reduce: decode a JPEG at
        1/reduce of its size (`reduction`); other files come at full size: the caller reads which from the result's
        size."""
        if self.memory is not None:
            return self.memory[i]
        file = self.files[i]
        try:
            x = decode_image_uint8(file, channels or self.channels, self.max_image_pixels, self.upright,
                                   reduce)  # (C, h', w')
        except UnreadableImageError as e:
            raise e.without_skip_hint() from None
        h, w = self.sizes[i]
        if tuple(x.shape[-2:]) not in ((h, w), (h // reduce, w // reduce)):
            stored, orientation = image_header(file, self.max_image_pixels)
            now_h, now_w = oriented_hw(stored, orientation, self.upright)
            raise ValueError(f"image {file} is now {now_w}x{now_h} (WxH) but was {w}x{h} when the run started; do "
                             f"not change images during a run")
        return x

    def load_for_display(self, i: int) -> torch.Tensor:
        """Image i as (C, h, w) uint8 to draw: files in colour (3 channels) whatever the model reads."""
        return self.load(i, channels=3 if self.channels in (1, 3) else self.channels)

    def subset(self, indices: Sequence[int]) -> ImageStore:
        """The images at `indices`, in that order."""
        out = ImageStore([self.files[i] for i in indices], [self.sizes[i] for i in indices],
                         channels=self.channels, max_image_pixels=self.max_image_pixels, upright=self.upright)
        if self.memory is not None:
            out.memory = [self.memory[i] for i in indices]
        return out


_Item = tuple[torch.Tensor | None, Any, Exception | None]  # sample, target, the error that stops the run


class DenseSamples(Dataset):
    """A dense task's samples: item (index, augmentation seed or None) -> (image (C, H, W) uint8, target, error).

    Subclasses implement `sample(i, g)` (g: the sample's torch.Generator in training, None for evaluation) and
    `collate(targets)`. An error a user can fix (an unreadable or changed file) comes back as the third element
    for the main process to raise as one line: raised in a worker, it would arrive wrapped in its traceback.
    """

    images: ImageStore  # the split's images (subclasses set it)

    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, i: int, g: torch.Generator | None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    @staticmethod
    def collate(targets: list[Any]) -> Any:
        """One batch's targets: by default a dict of per-sample lists."""
        return {k: [t[k] for t in targets] for k in targets[0]}

    def __getitem__(self, key: tuple[int, int | None]) -> _Item:
        i, seed = key
        g = None if seed is None else torch.Generator().manual_seed(seed)
        try:
            x, t = self.sample(i, g)
        except (ValueError, OSError) as e:
            return None, None, e
        return x, t, None


def _collate(items: list[_Item], targets) -> tuple[torch.Tensor | None, Any, Exception | None]:
    """Stack a batch's images (B, C, H, W) and collate its targets; or the first error (then no batch)."""
    error = next((e for _, _, e in items if e is not None), None)
    if error is not None:
        return None, None, error
    return torch.stack([x for x, _, _ in items]), targets([t for _, t, _ in items]), None


class _SeededBatches:
    """The DataLoader's batch_sampler: lists of (index, seed) for the selected epoch; a sample's seed is
    mix_seed(seed, epoch, AUGMENT_STREAM, position) in training and None for evaluation. Holds its own copy of
    the epoch state (no reference to the loader: see files._EpochBatches)."""

    def __init__(self, sampler: EpochSampler, seed: int, train: bool):
        self.sampler, self.seed, self.train = sampler, seed, train
        self.epoch, self.start_batch = 0, 0

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        indices, positions = self.sampler.order(self.epoch)
        for sl in self.sampler.batch_slices(self.start_batch):
            yield [(i, mix_seed(self.seed, self.epoch, AUGMENT_STREAM, p) if self.train else None)
                   for i, p in zip(indices[sl].tolist(), positions[sl].tolist())]

    def __len__(self) -> int:
        return self.sampler.num_batches - self.start_batch


class DenseLoader(SampledLoader):
    """Batches (images (B, C, H, W) float32 normalised on the delivery device, targets) of a `DenseSamples`, made
    in `num_workers` DataLoader workers (persistent, pinned on CUDA; 0: in this process). Images held in memory
    (the generated built-in scenes) are made in this process whatever num_workers says: on them a worker only adds
    the cost of sending the batch (10% slower epochs with 2 workers on 2 cores, BENCHMARKS.md)."""

    sends_uint8 = True

    def __init__(self, samples: DenseSamples, *, num_workers: int = 0, **kw):
        """kw: the Loader's (img_size, batch_size, train, channels, mean, std, hflip, seed, rank, world_size, ...)."""
        super().__init__(len(samples), **kw)
        self.samples = samples
        self.num_workers = num_workers if samples.images.memory is None else 0
        self._batches = _SeededBatches(self.sampler, self.seed, self.train)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self._batches.epoch, self._batches.start_batch = epoch, start_batch

    def sample(self, i: int, g: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
        """Sample i (C, H, W) uint8 and its target, made here (figures, tests)."""
        return self.samples.sample(i, g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        if self._loader is None:
            self._loader = worker_loader(self, self.samples, self._batches, self.num_workers,
                                         functools.partial(_collate, targets=type(self.samples).collate))
        for images, targets, error in self._loader:
            if error is not None:
                raise error
            yield self.deliver(images), targets


def warn_colour_dropped(files: Sequence[Path], channels: int, root: str | Path) -> bool:
    """Say once when a 1-channel model will read colour images (the first file's mode, from its header): they are
    read as grey. True when said."""
    if channels != 1 or not files:
        return False
    try:
        with Image.open(files[0]) as img:
            mode = img.mode
    except OSError:
        return False
    if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        log.warning("images under %s are colour (%s is %s) and the encoder takes 1 channel: they are read as grey; "
                    "use a 3-channel encoder (--data.channels 3) to keep their colour", root, files[0], mode)
        return True
    return False


def image_sizes(files: Sequence[Path], max_image_pixels: int, upright: bool) -> list[tuple[tuple[int, int], int]]:
    """(stored (h, w), EXIF orientation) of each file from its header alone (nothing decoded)."""
    out = []
    for f in files:
        try:
            out.append(image_header(f, max_image_pixels))
        except UnreadableImageError as e:
            raise e.without_skip_hint() from None
    return out


__all__ = ["DenseLoader", "DenseSamples", "ImageStore", "image_sizes", "to_uint8", "warn_colour_dropped"]
