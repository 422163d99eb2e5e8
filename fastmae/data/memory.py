"""A split held in memory (Fashion-MNIST, any uint8 tensor), augmented a whole batch at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .loader import SampledLoader
from .sampler import AUGMENT_STREAM, mix_seed
from .transforms import CROP_RATIO, eval_crop_box, resized_crop, sample_crop_boxes


class MemoryLoader(SampledLoader):
    """A split held in memory as uint8 (N, C0, h, w), augmented a batch at a time in the main process.

    C0 must be 1 (replicated to any C) or C. Fast: ~60k Fashion-MNIST-size training images/s on one core.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, **kw):
        """images (N, C0, h, w) uint8, labels (N,); kw: the Loader's (img_size, batch_size, train, channels, ...)."""
        channels = kw["channels"]
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, h, w), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] not in (1, channels):
            raise ValueError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        super().__init__(len(images), **kw)
        self.images = images
        self.labels = labels.long()
        self._mean = torch.tensor(self.mean).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self._std = torch.tensor(self.std).view(1, -1, 1, 1)
        self._pin = torch.cuda.is_available()

    def _augmentation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop boxes (total, 4) and flips (total,) for every position of the epoch, from (seed, epoch)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, AUGMENT_STREAM))
        h, w = self.images.shape[-2:]
        boxes = sample_crop_boxes(self.sampler.total, h, w, self.crop_scale, CROP_RATIO, g)  # (total, 4)
        flips = torch.rand(self.sampler.total, generator=g) < 0.5  # (total,)
        return boxes, flips & self.hflip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, positions = self.sampler.order(self.epoch)
        h, w = self.images.shape[-2:]
        if self.train:
            boxes, flips = self._augmentation(self.epoch)
        elif (h, w) != self.img_size:
            boxes = torch.tensor(eval_crop_box(h, w, *self.img_size)).expand(self.sampler.total, 4)
            flips = None
        for sl in self.sampler.batch_slices(self.start_batch):
            idx, pos = indices[sl], positions[sl]
            x = self.images[idx].float().div_(255.0)  # (B, C0, h, w)
            if self.train or (h, w) != self.img_size:
                x = resized_crop(x, boxes[pos], self.img_size, None if flips is None else flips[pos])  # (B, C0, H, W)
            x = (x.expand(-1, self.channels, -1, -1) - self._mean).div_(self._std)  # (B, C, H, W)
            y = self.labels[idx]
            if self._pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y
