"""Tar shards in webdataset layout (`KEY.jpg|png|webp|tif...` + optional `KEY.cls`): which shards a path means,
how many samples each holds, and each epoch's plan: which rank and worker reads which shard, in which order.

The plan is a pure function of (sample counts, seed, epoch, rank, world size, workers, batch size), so an epoch
can be resumed at any batch exactly, the way `EpochSampler` does it for indexable samples:

- Shards are shuffled from (seed, epoch) (training; evaluation keeps their order) and dealt round-robin to the
  world_size x workers reading slots: with shards that divide evenly, every sample is read once per epoch.
- Each worker reads its shards in order and emits their samples through a shuffle buffer of `buffer` samples
  (webdataset's `shuffle`, made replayable: `window_order` is the permutation it produces, drawn from (seed, epoch,
  rank, worker)); a resumed epoch re-opens the shard holding the oldest sample still in the buffer and skips,
  without decoding, the samples already emitted.
- Every rank trains on the same number of batches per epoch, `(samples // world_size) // batch_size`: a rank
  whose shards hold more this epoch leaves its surplus for another epoch; a rank whose shards hold fewer (shards
  of unequal sizes or a count that does not divide) reads its own samples a second time to make it up.

Shapes: S shards, W workers per rank, B batch size.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sampler import ORDER_STREAM, mix_seed

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm", "pgm")
LABEL_SUFFIX = "cls"
SIZES_FILE = "sizes.json"  # {shard file name: samples} beside the shards (OpenCLIP's name and layout)
CLASSES_FILE = "classes.json"  # ["class name", ...] beside the shards: label i names classes[i]
SHUFFLE_STREAM = 2  # random stream of the in-worker shuffle buffer (0 and 1: order and augmentation)


def shard_urls(path: str, flag: str = "--data.path") -> list[str]:
    """The shard URLs a --data.path means: a brace pattern (`train-{000000..000099}.tar`, '::' joins several), a
    list file (one shard per line: a path inside the list's folder, relative to it, or a URL), or `pipe:CMD` URLs.

    Local shards must exist: a missing one is one line naming it.
    """
    from webdataset.shardlists import expand_urls  # imported here: only the shard source needs webdataset

    if not path:
        raise ValueError(f"{flag} is empty: pass tar shards, e.g. '{flag} DIR/train-{{000000..000009}}.tar'")
    p = Path(path).expanduser()
    if not path.startswith("pipe:") and p.is_file() and not _is_tar_name(p.name):
        base = p.parent
        urls = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                if _has_scheme(line):
                    urls.append(line)
                    continue
                inside = Path(os.path.normpath(base / line))  # an absolute line stays itself
                if not inside.is_relative_to(Path(os.path.normpath(base))):
                    raise ValueError(f"{flag} {path}: the list names {line}, outside the list's folder {base}; a "
                                     f"shard list names shards in its own folder (or URLs): put the list beside the "
                                     f"shards")
                urls.append(str(inside))
        if not urls:
            raise ValueError(f"{flag} {path}: the list file names no shards; put one shard path or URL a line")
    else:
        urls = list(expand_urls(path))
    for u in urls:
        if not _has_scheme(u) and not Path(u).expanduser().is_file():
            what = "is a folder, not a tar shard" if Path(u).is_dir() else "does not exist"
            raise FileNotFoundError(f"shard {u} {what} (from {flag} {path}); fix the pattern or the list of shards")
    return [u if _has_scheme(u) else str(Path(u).expanduser()) for u in urls]


def _is_tar_name(name: str) -> bool:
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def _has_scheme(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def image_member(sample: dict) -> str | None:
    """The suffix of a grouped sample's image (the first of IMAGE_SUFFIXES it has), or None."""
    return next((s for s in IMAGE_SUFFIXES if s in sample), None)


def read_label(sample: dict, where: str) -> int:
    """The integer in a sample's .cls member (-1 without one); ValueError naming the sample otherwise."""
    raw = sample.get(LABEL_SUFFIX)
    if raw is None:
        return -1
    try:
        label = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{where}.cls holds {raw[:20]!r}, not an integer class index; write 0, 1, 2, ...") from None
    if label < 0:
        raise ValueError(f"{where}.cls holds the negative label {label}; labels are 0, 1, 2, ...")
    return label


@dataclass(frozen=True)
class ShardIndex:
    """The shards of a split, their sample counts, and the class names (label i names classes[i]; may be empty
    while num_classes > 0 when the shards carry .cls labels without names)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...]
    num_classes: int

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def limited(self, limit: int) -> ShardIndex:
        """The first `limit` samples (whole shards, then part of one); 0 = all."""
        if limit <= 0 or limit >= self.num_samples:
            return self
        counts, left = [], limit
        for c in self.counts:
            if left == 0:
                break
            counts.append(min(c, left))
            left -= counts[-1]
        return ShardIndex(self.urls[: len(counts)], tuple(counts), self.classes, self.num_classes)


def index_shards(urls: list[str], open_stream=None) -> ShardIndex:
    """Sample counts of the shards: from sizes.json (and classes.json) beside them when it lists every shard (as
    `fastmae shard` and OpenCLIP's tools write it), else by reading each shard once (members, no decoding)."""
    folders = {os.path.dirname(u) for u in urls if not _has_scheme(u)}
    if len(folders) == 1:
        folder = Path(folders.pop())
        sizes = read_json_beside(folder / SIZES_FILE, dict)
        classes = read_json_beside(folder / CLASSES_FILE, list)
        if sizes is not None and all(os.path.basename(u) in sizes for u in urls):
            counts = tuple(stated_count(folder / SIZES_FILE, u, sizes[os.path.basename(u)]) for u in urls)
            if not any(counts):
                raise ValueError(f"{folder / SIZES_FILE} gives every shard 0 samples: there is nothing to train on; "
                                 f"fix it, or delete it and the counts are read from the shards")
            if classes is not None:
                return ShardIndex(tuple(urls), counts, tuple(map(str, classes)), len(classes))
    counts, top = [], -1
    for url in urls:
        n = 0
        try:
            for sample in iterate_samples(url, open_stream):
                if image_member(sample) is not None:
                    n += 1
                    top = max(top, read_label(sample, f"{url}#{sample['__key__']}"))
        except (tarfile.TarError, OSError, EOFError) as e:
            why = f"its command failed ({e})" if url.startswith("pipe:") else f"not a readable tar file ({e})"
            raise ValueError(f"cannot count the samples of shard {url}: {why} after {n} samples; fix or rewrite the "
                             f"shard, or leave it out of --data.path") from None
        counts.append(n)
    if not any(counts):
        raise ValueError(f"the shards hold no images ({', '.join(urls[:3])}{', ...' if len(urls) > 3 else ''}): "
                         f"members must be named KEY.{'|'.join(IMAGE_SUFFIXES[:5])} (webdataset layout)")
    return ShardIndex(tuple(urls), tuple(counts), (), top + 1)


MIN_MEMBER_BYTES = 1024  # a tar member takes a 512-byte header and at least one 512-byte data block


def stated_count(sizes_path: Path, url: str, value) -> int:
    """A shard's sample count as sizes.json states it, checked before anything trusts it: a whole number >= 0, and no
    more samples than the shard's bytes can hold (a local file); else a ValueError naming sizes.json and the fix."""
    fix = "fix it, or delete it and the counts are read from the shards"
    name = os.path.basename(url)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise ValueError(f"{sizes_path} gives shard {name} the count {value!r}, not a whole number of samples >= 0; "
                         f"{fix}")
    count = int(value)
    if not _has_scheme(url) and os.path.isfile(url):
        most = os.path.getsize(url) // MIN_MEMBER_BYTES
        if count > most:
            raise ValueError(f"{sizes_path} says shard {name} holds {count} samples, but its {os.path.getsize(url)} "
                             f"bytes hold at most {most} tar members; {fix}")
    return count


def read_json_beside(path: Path, kind: type, fix: str = "delete it and the counts are read from the shards"):
    """sizes.json / classes.json beside shards: the JSON value if it is of `kind`; None when there is no such file;
    a ValueError naming a bad one and `fix`."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} ({e}); {fix}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not a {kind.__name__}; {fix}")
    return value


MAX_MEMBER_BYTES = 2**30  # a tar member declaring more is refused before it is read (members are read into memory)


def tar_members(fileobj, url: str):
    """{'fname', 'data'} of each regular member of a tar stream, as webdataset's tar_file_iterator gives them
    (webdataset's `__*__` metadata members skipped), each refused by its declared size before it is read: a sparse
    member (a 10 GB hole in a few KB) or one over MAX_MEMBER_BYTES is a ValueError naming it."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                continue
            if info.issparse() or info.size > MAX_MEMBER_BYTES:
                kind = "a sparse member" if info.issparse() else "a member"
                raise ValueError(f"shard {url}: {info.name} is {kind} of {info.size} bytes once read, more than an "
                                 f"image of a shard may take ({MAX_MEMBER_BYTES // 2**20} MiB); rewrite the shard "
                                 f"without it")
            yield {"fname": info.name, "data": tar.extractfile(info).read()}
            tar.members = []  # a stream's members are not kept


def iterate_samples(url: str, open_stream=None, handler=None):
    """The grouped samples ({'__key__', suffix: bytes, ...}) of one shard, in stored order: webdataset's stream
    opener and key grouping over `tar_members`."""
    from webdataset.gopen import gopen
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys

    handler = handler or reraise_exception
    stream = (open_stream or gopen)(url)
    try:
        files = tar_members(stream, url)
        tagged = ({**f, "__url__": url} for f in files)
        yield from group_by_keys(tagged, handler=handler)  # KEY.SUFFIX: webdataset's own keys, suffix lower-cased
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# The epoch plan


def deal_shards(num_shards: int, *, shuffle: bool, seed: int, epoch: int, slots: int) -> list[list[int]]:
    """Shard indices for each of `slots` readers (rank-major: slot = worker * world_size + rank), in reading order:
    the epoch's shard order (shuffled from (seed, epoch) when `shuffle`) dealt round-robin."""
    order = np.arange(num_shards)
    if shuffle:
        order = np.random.default_rng(mix_seed(seed, epoch, ORDER_STREAM)).permutation(num_shards)
    return [order[s::slots].tolist() for s in range(slots)]


def window_order(n: int, buffer: int, seed: int) -> np.ndarray:
    """The order in which a shuffle buffer of `buffer` samples emits a stream of n samples (ordinals 0..n-1):
    fill to `buffer`, emit a random one, refill. Sample j never comes out before ordinal j - buffer + 1 was read,
    so a reader needs to hold at most `buffer` samples. buffer <= 1: the stream's own order."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    u = np.random.default_rng(seed).random(n)
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    nxt = 0
    for j in range(n):
        while nxt < n and len(buf) < buffer:
            buf.append(nxt)
            nxt += 1
        k = int(u[j] * len(buf))
        out[j] = buf[k]
        buf[k] = buf[-1]
        buf.pop()
    return out


def worker_quotas(caps: list[int], total: int) -> list[int]:
    """Batches for each worker summing to `total`: as even as their capacities (whole batches they hold) allow,
    the rest spread over all workers when the capacities fall short."""
    quotas = [0] * len(caps)
    for _ in range(total):
        room = [c - q for c, q in zip(caps, quotas)]
        w = max(range(len(caps)), key=lambda i: (room[i], -quotas[i], -i))  # most room left; ties: fewest, first
        quotas[w] += 1
    return quotas


def interleave(quotas: list[int]) -> list[tuple[int, int]]:
    """The rank's batch sequence as (worker, the worker's batch number): round robin over the workers that still
    have batches (what a DataLoader over iterable workers yields)."""
    out, done, total = [], [0] * len(quotas), sum(quotas)
    while len(out) < total:
        for w, q in enumerate(quotas):
            if done[w] < q:
                out.append((w, done[w]))
                done[w] += 1
    return out


@dataclass(frozen=True)
class WorkerPlan:
    """What one reader of one rank does in one epoch: its shards, in order, with their counts; `positions[k]` the
    rank's batch number of its k-th batch, `sizes[k]` that batch's size (all `sizes[0]` but an evaluation's last);
    `order` the virtual ordinal of each of its batches' places (ordinal v is sample v % n of the concatenated shards,
    so ordinals >= n are a second reading), drawn when first asked for: from `seed` through a shuffle buffer of
    `buffer` over a stream of `stream` samples."""

    shards: tuple[int, ...]
    counts: tuple[int, ...]
    positions: tuple[int, ...]
    sizes: tuple[int, ...]
    stream: int
    buffer: int
    seed: int

    @functools.cached_property
    def order(self) -> np.ndarray:
        return window_order(self.stream, self.buffer, self.seed)[: sum(self.sizes)]

    @functools.cached_property
    def starts(self) -> np.ndarray:
        """(shards + 1,) the first ordinal of each shard, then n."""
        return np.cumsum((0,) + self.counts)

    def batch_slice(self, k: int) -> slice:
        """Where the k-th batch's places are in `order`."""
        start = k * self.sizes[0]
        return slice(start, start + self.sizes[k])

    def locate(self, v: int) -> tuple[int, int]:
        """(position of the shard in `shards`, sample number in that shard) of virtual ordinal v."""
        o = v % int(self.starts[-1])
        s = int(np.searchsorted(self.starts, o, side="right")) - 1
        return s, o - int(self.starts[s])


def rank_batches(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Training batches every rank takes per epoch (whatever the shard sizes): floor(samples / world / B)."""
    per_rank = num_samples // world_size
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def plan_epoch(counts: tuple[int, ...], *, epoch: int, seed: int, train: bool, rank: int, world_size: int,
               workers: int, batch_size: int, buffer: int) -> list[WorkerPlan]:
    """Each reader's plan for this rank and epoch (see the module docstring).

    train: shuffled shards and buffer, every rank the same `rank_batches` of full batches (the epoch is a fixed
    length whatever the shards dealt). Evaluation: shards in order, no buffer, each reader's samples once, its last
    batch partial; ranks may then differ in length.
    """
    slots = world_size * workers
    dealt = deal_shards(len(counts), shuffle=train, seed=seed, epoch=epoch, slots=slots)
    mine = [dealt[w * world_size + rank] for w in range(workers)]
    held = [sum(counts[s] for s in shards) for shards in mine]
    if not any(held):
        raise ValueError(f"rank {rank} got no shard: there are {len(counts)} shards for {world_size} processes; "
                         f"write more, smaller shards (fastmae shard --shard.max_count N)")
    if train:
        total = rank_batches(sum(counts), world_size, batch_size, drop_last=True)
        readers = [w for w in range(workers) if held[w]]  # a reader without shards this epoch takes no batch
        quotas = [0] * workers
        for w, q in zip(readers, worker_quotas([held[w] // batch_size for w in readers], total)):
            quotas[w] = q
        sizes = [[batch_size] * q for q in quotas]
    else:
        sizes = [[min(batch_size, h - k * batch_size) for k in range(math.ceil(h / batch_size))] for h in held]
        quotas = [len(s) for s in sizes]
    positions: list[list[int]] = [[] for _ in range(workers)]
    for b, (w, _) in enumerate(interleave(quotas)):
        positions[w].append(b)
    return [WorkerPlan(tuple(mine[w]), tuple(counts[s] for s in mine[w]), tuple(positions[w]), tuple(sizes[w]),
                       stream=max(sum(sizes[w]), held[w]), buffer=buffer if train else 1,
                       seed=mix_seed(seed, epoch, SHUFFLE_STREAM, rank, w)) for w in range(workers)]
