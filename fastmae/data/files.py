"""Image files decoded in DataLoader worker processes, with the same epoch order and augmentation law as memory.

Each worker gets (index, augmentation seed) pairs computed in the main process, so the batches of an
epoch do not depend on the number of workers, and a resumed epoch replays exactly.
"""

from __future__ import annotations

import functools
import signal
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .decode import UnreadableImageError, load_image
from .loader import Loader, SampledLoader, stack_images
from .sampler import AUGMENT_STREAM, EpochSampler, mix_seed

_Item = tuple[torch.Tensor | None, int, tuple[tuple[str, str], ...], ValueError | None]  # image, label, skipped, error
_Batch = tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]], ValueError | None]


class ImageFiles(Dataset):
    """Image files with labels; item (index, augmentation seed) -> (image (C, H, W), label, skipped files, error).

    `transform` holds load_image's keywords (img_size, channels, mean, std, train, crop_scale, hflip,
    max_image_pixels). With skip_corrupt an unreadable file is replaced by the next readable one
    (deterministically) and reported in the third element, so the main process learns of it even from a
    worker. A file that stops the run comes back as the error (image None) for the main process to raise:
    raised in a worker, it would reach the user wrapped in the worker's traceback instead of one clear line.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: dict[str, Any], skip_corrupt: bool = False):
        self.samples = list(samples)
        self.transform = dict(transform)
        self.skip_corrupt = skip_corrupt
        self._bad: set[int] = set()  # per process: files already found unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> _Item:
        index, seed = key
        skipped = []
        n = len(self.samples)
        for i in (j % n for j in range(index, index + n)):
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                x = load_image(path, generator=torch.Generator().manual_seed(seed), **self.transform)
            except ValueError as e:  # UnreadableImageError, or a file the model cannot take (band count)
                if not (self.skip_corrupt and isinstance(e, UnreadableImageError)):
                    return None, label, tuple(skipped), e
                self._bad.add(i)
                skipped.append((path, e.reason))
                continue
            return x, label, tuple(skipped), None
        error = ValueError(
            f"none of the {n} image files could be read (first: {self.samples[0][0]}); "
            f"the warnings above list them: fix or replace the files"
        )
        return None, -1, tuple(skipped), error


def _collate(items: list[_Item], mean: Sequence[float], std: Sequence[float]) -> _Batch:
    """Stack images (B, C, H, W: uint8 pixels when all are 8-bit, see stack_images) and labels (B,); gather the
    skipped files and the first error (then no batch)."""
    skipped = [s for _, _, sk, _ in items for s in sk]
    error = next((e for _, _, _, e in items if e is not None), None)
    if error is not None:
        return None, None, skipped, error
    images = stack_images([x for x, _, _, _ in items], mean, std)  # (B, C, H, W)
    labels = torch.tensor([y for _, y, _, _ in items], dtype=torch.int64)  # (B,)
    return images, labels, skipped, None


WORKER_GRACE_S = 300  # a worker that got SIGTERM ends by itself this long after, if nobody asked it to sooner


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """Worker init: leave SIGTERM/SIGUSR1/SIGINT to the main process.

    torchrun, Slurm and `kill -- -PGID` signal the whole process group; a worker that died of it would
    crash the main process ("DataLoader worker is killed by signal") before it could save a checkpoint.
    Workers still end: the main process shuts them down (`FileLoader.close`, when the loader is collected,
    at the latest at exit), a worker whose main process died exits on its own (DataLoader's watchdog), and
    as a last resort a worker that got SIGTERM ends WORKER_GRACE_S seconds later (SIGALRM).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _grace_then_exit)


def _grace_then_exit(signum, frame) -> None:
    """SIGTERM in a worker: keep serving while the main process saves, but do not outlive the grace period."""
    remaining = signal.alarm(0)  # a second SIGTERM must not push the deadline back
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(remaining or WORKER_GRACE_S)


class _EpochBatches:
    """The DataLoader's batch_sampler: lists of (index, augmentation seed) for the selected epoch.

    Holds its own copy of the epoch state rather than a reference to the loader: a reference
    cycle through a DataLoader with persistent workers makes its clean-up take 5 s per worker.
    """

    def __init__(self, sampler: EpochSampler, seed: int):
        self.sampler, self.seed = sampler, seed
        self.epoch, self.start_batch = 0, 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices, positions = self.sampler.order(self.epoch)
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, AUGMENT_STREAM))
        seeds = torch.randint(0, 2**62, (self.sampler.total,), generator=g)[positions]  # one seed per position
        for sl in self.sampler.batch_slices(self.start_batch):
            yield list(zip(indices[sl].tolist(), seeds[sl].tolist()))

    def __len__(self) -> int:
        return self.sampler.num_batches - self.start_batch


class FileLoader(SampledLoader):
    """Image files decoded by Pillow in `num_workers` DataLoader workers (persistent, pinned on CUDA)."""

    def __init__(self, samples: Sequence[tuple[str, int]], *, num_workers: int = 0, skip_corrupt: bool = False,
                 max_image_pixels: int = 0, uint8: bool = True, **kw):
        """samples: (path, label) pairs; uint8: workers send 8-bit pixels, normalised on delivery (False: in the
        workers); kw: the Loader's (img_size, batch_size, train, channels, mean, std, ...)."""
        super().__init__(len(samples), **kw)
        transform = dict(img_size=self.img_size, channels=self.channels, mean=self.mean, std=self.std,
                         train=self.train, crop_scale=self.crop_scale, hflip=self.hflip,
                         max_image_pixels=max_image_pixels, uint8=uint8)
        self.dataset = ImageFiles(samples, transform, skip_corrupt)
        self.sends_uint8 = uint8  # 8-bit pixels cross from the workers as uint8
        self.num_workers = num_workers
        self._batches = _EpochBatches(self.sampler, self.seed)
        self._loader: DataLoader | None = None  # made on first use, so workers start only when needed
        self._finalizer: weakref.finalize | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self._batches.epoch, self._batches.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            self._loader = worker_loader(self, self.dataset, self._batches, self.num_workers,
                                         functools.partial(_collate, mean=self.mean, std=self.std))
        for images, labels, skipped, error in self._loader:
            self._note_skipped(skipped)
            if error is not None:
                raise error
            yield self.deliver(images), labels


def worker_loader(owner: Loader, dataset, batch_sampler, num_workers: int, collate_fn=None) -> DataLoader:
    """The DataLoader of a loader whose `num_workers` workers (persistent, pinned on CUDA, leaving stop signals to the
    main process) make its batches from `batch_sampler` (None: an iterable dataset that yields whole batches);
    shut down when `owner` is collected or the program exits."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": None}
    loader = DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        # iter(DataLoader) draws its workers' base seed from this generator, not the global RNG that masks
        # and drop-path use (saved in checkpoints): otherwise a resumed epoch draws once more from that
        # stream than the uninterrupted run did, and trains on other masks. Augmentation has its own seeds.
        generator=torch.Generator().manual_seed(owner.seed),
    )
    # Holds the DataLoader (and its queues) alive until the owner is collected or the program exits, so the workers
    # are always asked to stop: they ignore SIGTERM, and a DataLoader collected in a reference cycle may lose its
    # queues before it can tell them.
    owner._finalizer = weakref.finalize(owner, shutdown_workers, loader)
    return loader


def shutdown_workers(loader: DataLoader) -> None:
    """Ask a DataLoader's persistent workers to exit and wait for them."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
