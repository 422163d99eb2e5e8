"""`ShardLoader`: tar shards streamed by DataLoader workers, each reading its own shards (data/shards.py's plan).

Nothing is indexed per sample: a worker opens its shards one after another (a file, or a `pipe:` command's
output), keeps the samples its shuffle buffer would hold, decodes and augments those its batches take, and
tags each batch with its place in the rank's epoch; the main process yields them in that order. An epoch
resumed at batch b yields exactly the batches b, b+1, ... of an uninterrupted run: each worker re-opens the
shard holding the oldest sample it still needs and skips (without decoding) those already emitted.
"""

from __future__ import annotations

import tarfile
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import SKIP_HINT, UnreadableImageError, load_image
from .files import worker_loader
from .loader import Loader, stack_images
from .sampler import AUGMENT_STREAM, mix_seed
from .shards import ShardIndex, WorkerPlan, image_member, iterate_samples, plan_epoch, read_label

_Batch = tuple[int, torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]], Exception | None]


class _ShardReader:
    """Samples of one worker's shards by virtual ordinal (v -> sample v % n of the shards read in order), read
    forward once, keeping only the samples still to be emitted; a backwards request re-opens the shard holding it."""

    def __init__(self, index: ShardIndex, plan: WorkerPlan, needed: np.ndarray, open_stream=None):
        self.urls = [index.urls[s] for s in plan.shards]
        self.plan = plan
        top = int(needed.max()) + 1 if len(needed) else 0
        self.first = int(needed.min()) if len(needed) else 0  # a resumed epoch's oldest sample still in the buffer
        self.wanted = np.zeros(top, dtype=bool)
        self.wanted[needed] = True
        self.cache: dict[int, dict | None] = {}
        self.samples: Iterator[dict] | None = None
        self.next_v = 0  # the virtual ordinal the open stream gives next
        self.shard_end = 0  # virtual ordinal where the open shard ends
        self.open_stream = open_stream
        self.problems: dict[str, str] = {}  # shard -> why it ended before its count

    def get(self, v: int) -> dict | None:
        """The sample (webdataset's dict, '__url__' and '__key__' set) at virtual ordinal v; None if its shard
        ended before it (a damaged or shorter shard: the reason is in `problems`)."""
        if v in self.cache:
            self.wanted[v] = False
            return self.cache.pop(v)
        if self.samples is None:
            self._open(min(v, self.first))
        elif v < self.next_v:
            self._open(v)
        while True:
            if self.next_v >= self.shard_end:
                self._open(self.next_v)
            r, sample = self.next_v, next(self.samples)
            self.next_v += 1
            if r == v:
                self.wanted[v] = False
                return sample
            if r < len(self.wanted) and self.wanted[r]:
                self.cache[r] = sample

    def shard_of(self, v: int) -> str:
        """The shard that holds virtual ordinal v."""
        return self.urls[self.plan.locate(v)[0]]

    def _open(self, v: int) -> None:
        """Open the shard holding virtual ordinal v, positioned at its first sample."""
        s, i = self.plan.locate(v)
        self.next_v = v - i  # the shard's first sample, in the same reading as v
        self.shard_end = self.next_v + self.plan.counts[s]
        self.url = self.urls[s]
        self.samples = self._images(self.url)

    def _images(self, url: str) -> Iterator[dict]:
        """The shard's samples that have an image, then None for each one its count promised but it lacked."""
        got = 0
        try:
            for sample in iterate_samples(url, self.open_stream):
                if image_member(sample) is not None:
                    got += 1
                    yield sample
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            self.problems[url] = f"the tar stream broke after {got} samples: {e}"
        else:
            self.problems[url] = f"it holds {got} images, its count says more"
        while True:
            yield None


class ShardStream(IterableDataset):
    """The batches of this process's readers: (rank's batch number, images (B, C, H, W), labels (B,), skipped,
    error). In a worker, the reader of the worker's id; without workers, the one reader."""

    def __init__(self, index: ShardIndex, transform: dict[str, Any], *, batch_size: int, train: bool, seed: int,
                 rank: int, world_size: int, readers: int, buffer: int, skip_corrupt: bool, open_stream=None):
        self.index, self.transform = index, dict(transform)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.readers, self.buffer = rank, world_size, readers, buffer
        self.skip_corrupt, self.open_stream = skip_corrupt, open_stream
        # (epoch, start_batch) in shared memory: persistent workers keep their copy of this object across epochs
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.position[0])

    @property
    def start_batch(self) -> int:
        return int(self.position[1])

    def plans(self, epoch: int) -> list[WorkerPlan]:
        return plan_epoch(self.index.counts, epoch=epoch, seed=self.seed, train=self.train, rank=self.rank,
                          world_size=self.world_size, workers=self.readers, batch_size=self.batch_size,
                          buffer=self.buffer)

    def __iter__(self) -> Iterator[_Batch]:
        info = get_worker_info()
        plan = self.plans(self.epoch)[info.id if info is not None else 0]
        first = next((k for k, b in enumerate(plan.positions) if b >= self.start_batch), len(plan.positions))
        if first == len(plan.positions):
            return
        reader = _ShardReader(self.index, plan, plan.order[plan.batch_slice(first).start:], self.open_stream)
        for k in range(first, len(plan.positions)):
            yield self._batch(plan, k, reader)

    def _batch(self, plan: WorkerPlan, k: int, reader: _ShardReader) -> _Batch:
        """Read, decode and augment the k-th batch of a reader; unreadable samples are replaced by another image
        of the same batch with skip_corrupt, else the first one is the error."""
        b = plan.positions[k]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, AUGMENT_STREAM, self.rank, b))
        seeds = torch.randint(0, 2**62, (plan.sizes[k],), generator=g).tolist()
        images: list[torch.Tensor | None] = []
        labels: list[int] = []
        skipped: list[tuple[str, str]] = []
        for v, seed in zip(plan.order[plan.batch_slice(k)].tolist(), seeds):
            sample = reader.get(v)
            x, y, problem = self._decode(sample, seed, reader, v)
            if problem is not None:
                if not self.skip_corrupt:
                    return b, None, None, skipped, problem
                skipped.append((getattr(problem, "where", "?"), getattr(problem, "reason", str(problem))))
            images.append(x)
            labels.append(y)
        good = [i for i, x in enumerate(images) if x is not None]
        if not good:
            return b, None, None, skipped, ValueError(
                f"no image of batch {b} could be read (e.g. {skipped[0][0]}: {skipped[0][1]}); fix or rewrite "
                f"the shards")
        for i, x in enumerate(images):  # stand-ins keep the batch's size and every later batch where it was
            if x is None:
                j = good[i % len(good)]
                images[i], labels[i] = images[j], labels[j]
        mean, std = self.transform["mean"], self.transform["std"]
        return b, stack_images(images, mean, std), torch.tensor(labels, dtype=torch.int64), skipped, None  # (B,C,H,W)

    def _decode(self, sample: dict | None, seed: int, reader: _ShardReader,
                v: int) -> tuple[Any, int, Exception | None]:
        if sample is None:
            url = reader.shard_of(v)  # the shard that lacked it (a sample from the cache may be of an earlier one)
            why = reader.problems.get(url, "the sample is missing")
            e = ValueError(f"shard {url}: {why}; rewrite the shard (fastmae shard) or delete the sizes.json beside "
                           f"it so it is counted again{SKIP_HINT}")
            e.where, e.reason = url, why
            return None, -1, e
        where = f"{sample['__url__']}#{sample['__key__']}"
        suffix = image_member(sample)
        try:
            label = read_label(sample, where)
            classes = self.index.num_classes
            if self.index.classes and label >= classes:
                raise ValueError(f"{where}.cls holds {label}, but the classes.json beside the shards names {classes} "
                                 f"classes (0..{classes - 1}); fix the label or add the class to classes.json")
            x = load_image(f"{where}.{suffix}", data=sample[suffix],
                           generator=torch.Generator().manual_seed(seed), **self.transform)
        except ValueError as e:
            if not isinstance(e, UnreadableImageError):
                return None, -1, e  # a label or band count the run cannot take: never skipped
            e.where = where
            return None, -1, e
        return x, label, None


class ShardLoader(Loader):
    """Tar shards (webdataset layout) for one rank, read by max(1, num_workers) readers (see data/shards.py)."""

    def __init__(self, index: ShardIndex, *, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 buffer: int, skip_corrupt: bool = False, max_image_pixels: int = 0,
                 uint8: bool = True, open_stream=None, **kw):
        """buffer: a worker's shuffle buffer (--data.shuffle_buffer); uint8: workers send 8-bit pixels, normalised on
        delivery (False: in the workers); kw: the Loader's (img_size, batch_size, train, channels, mean, std,
        crop_scale, hflip, seed)."""
        super().__init__(num_samples=index.num_samples, num_classes=index.num_classes, classes=index.classes, **kw)
        transform = dict(img_size=self.img_size, channels=self.channels, mean=self.mean, std=self.std,
                         train=self.train, crop_scale=self.crop_scale, hflip=self.hflip,
                         max_image_pixels=max_image_pixels, uint8=uint8)
        self.index, self.num_workers = index, num_workers
        self.sends_uint8 = uint8  # 8-bit pixels cross from the workers as uint8
        self.stream = ShardStream(index, transform, batch_size=self.batch_size, train=self.train, seed=self.seed,
                                  rank=rank, world_size=world_size, readers=max(1, num_workers), buffer=buffer,
                                  skip_corrupt=skip_corrupt, open_stream=open_stream)
        plans = self.stream.plans(0)  # checks now that every rank gets a shard; the length is every epoch's
        self._len = sum(len(p.positions) for p in plans)
        self._loader: DataLoader | None = None  # made on first use; its workers persist across epochs
        self._finalizer: weakref.finalize | None = None

    def sample_names(self) -> list[str]:
        """'SHARD#N' (the N-th image of that shard, from 0) of every sample this rank delivers in the selected
        epoch, in delivery order: what each row of a split's features is (fastmae embed)."""
        rows: dict[int, list[str]] = {}
        for plan in self.stream.plans(self.epoch):
            for k, b in enumerate(plan.positions):
                rows[b] = [f"{self.index.urls[plan.shards[s]]}#{i}"
                           for s, i in map(plan.locate, plan.order[plan.batch_slice(k)].tolist())]
        return [name for b in sorted(rows) if b >= self.start_batch for name in rows[b]]

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self.stream.position[0], self.stream.position[1] = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            self._loader = worker_loader(self, self.stream, None, self.num_workers)  # each item a whole batch
        pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        nxt = self.start_batch
        for b, images, labels, skipped, error in self._loader:  # in worker round-robin order; yielded in the plan's
            self._note_skipped(skipped)
            if error is not None:
                raise error
            pending[b] = (self.deliver(images), labels)
            while nxt in pending:
                yield pending.pop(nxt)
                nxt += 1
        if pending or nxt != len(self):
            raise RuntimeError(f"shard readers ended at batch {nxt} of {len(self)} (held {sorted(pending)[:5]})")
