"""`fastmae shard`: write tar shards in webdataset layout from any image source, for `--data.source shards`.

Each sample is `KEY.EXT` holding the file's own encoded bytes (no re-encoding; Fashion-MNIST, which has no files,
is written as lossless PNG) and, for labelled sources, `KEY.cls` (the class index as text). Samples are written in
a fixed random order (`--shard.shuffle`, seed 0) so that each shard mixes the classes. Every shard is written
to a temporary name and renamed when complete, and a command that does not finish (a stop signal, a full disk, an
unreadable file) removes the shards it had written, so running it again starts afresh; `sizes.json` (samples per
shard, OpenCLIP's layout) and `classes.json` beside them let readers skip counting.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from ..config import FASHION_MNIST_DIR, POSITIVE_INT, DataConfig, Rule, at_least, validate
from ..data.shards import CLASSES_FILE, SIZES_FILE, read_json_beside
from ..data.sources import FASHION_MNIST_CLASSES, file_samples, load_fashion_mnist
from ..weights.checkpoint import DiskFullError, atomic_write, atomic_write_text

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae shard --help`).

@dataclass(frozen=True)
class ShardSourceConfig:
    """The images to write."""

    RULES: ClassVar[dict[str, Rule]] = {"limit": at_least(0)}

    source: Literal["fashion-mnist", "folder", "unlabelled", "list"] = "fashion-mnist"
    """fashion-mnist: IDX .gz files (written as PNG); folder: one subfolder per class; unlabelled: every image under
    `path`; list: a text file of image paths, optionally each with an integer label."""
    path: str = FASHION_MNIST_DIR
    """The IDX folder, the image folder, or the list file."""
    split: Literal["train", "eval"] = "train"
    """Fashion-MNIST's split to write (train: 60,000 images, eval: its 10,000 test images)."""
    limit: int = 0
    """Write only the first N samples (0 = all)."""
    skip_corrupt: bool = False
    """List source: leave out listed files that do not exist (counted) instead of stopping."""


@dataclass(frozen=True)
class ShardParams:
    """How samples are cut into shards."""

    RULES: ClassVar[dict[str, Rule]] = {"max_count": POSITIVE_INT, "max_size": POSITIVE_INT}

    max_count: int = 10000
    """Most samples per shard."""
    max_size: int = 1_000_000_000
    """Most bytes of sample data per shard (a shard holds at least one sample)."""
    shuffle: bool = True
    """Write the samples in a fixed random order (seed 0), so every shard mixes the classes; --shard.no_shuffle
    keeps the source's order."""


@dataclass(frozen=True)
class ShardConfig:
    """Write tar shards (webdataset layout) from a folder, a list, an unlabelled folder or Fashion-MNIST.

    fastmae shard --data.source folder --data.path ~/imagenet/train --output 'shards/train-%06d.tar'

    then train from them: fastmae pretrain --data.source shards --data.path 'shards/train-{000000..000127}.tar'
    """

    output: str = "shards/train-%06d.tar"
    """Shard file names, with one printf field for the shard number (e.g. 'DIR/train-%06d.tar')."""
    data: ShardSourceConfig = field(default_factory=ShardSourceConfig)
    shard: ShardParams = field(default_factory=ShardParams)


# ---------------------------------------------------------------------------------------------------
# Writing.

FIELD = re.compile(r"%[-0 #+]*(\d*)([a-zA-Z%])")  # a printf field of --output: (width, conversion)


def check_pattern(output: str) -> None:
    """ValueError unless --output has exactly one integer printf field."""
    fields = [m for m in FIELD.finditer(output) if m.group(0) != "%%"]
    if len(fields) != 1 or fields[0].group(2) not in ("d", "i"):
        raise ValueError(f"--output {output!r} needs one integer field for the shard number, e.g. "
                         f"'shards/train-%06d.tar'")
    if "%" in os.path.dirname(output):
        raise ValueError(f"--output {output!r}: the shard number goes in the file name, not the folder (all shards "
                         f"of a set, their sizes.json and classes.json share one folder)")


def source_samples(cfg: ShardSourceConfig) -> tuple[list, list[str], int]:
    """(samples, class names, missing): a sample is (name, suffix, bytes-or-path, label)."""
    if cfg.source == "fashion-mnist":
        images, labels = load_fashion_mnist(cfg.path, cfg.split)  # (N, 1, 28, 28) uint8, (N,)
        return ([(f"{i:06d}", "png", images[i, 0], int(labels[i])) for i in range(len(images))],
                list(FASHION_MNIST_CLASSES), 0)
    data = DataConfig(source=cfg.source, path=cfg.path, skip_corrupt=cfg.skip_corrupt)
    samples, classes, _, missing = file_samples(data, "train")
    out = []
    for path, label in samples:
        suffix = Path(path).suffix.lower().lstrip(".") or "img"
        out.append((Path(path).name, "jpg" if suffix == "jpeg" else suffix, path, label))
    return out, list(classes), len(missing)


def _payload(item) -> bytes:
    """A sample's image bytes: the file's own, or a uint8 (H, W) image encoded as PNG."""
    if isinstance(item, str):
        return Path(item).read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(item)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(cfg: ShardConfig, progress: bool = True) -> dict:
    """Write the shards; returns the summary (shards, samples, bytes, seconds, folder)."""
    from tqdm import tqdm
    from webdataset import TarWriter

    check_pattern(cfg.output)
    samples, classes, missing = source_samples(cfg.data)
    if cfg.data.limit:
        samples = samples[: cfg.data.limit]
    if not samples:
        raise ValueError(f"no samples to write from --data.path {cfg.data.path}")
    if cfg.shard.shuffle:
        samples = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
    folder = Path(cfg.output % 0).parent
    sizes_path, classes_path = folder / SIZES_FILE, folder / CLASSES_FILE
    fix = "fix or remove it, or write the shards to another folder"
    sizes = read_json_beside(sizes_path, dict, fix) or {}
    old_classes = read_json_beside(classes_path, list, fix)
    labelled = any(s[3] >= 0 for s in samples)
    names = classes if classes else ([str(i) for i in range(max(s[3] for s in samples) + 1)] if labelled else [])
    if old_classes is not None and old_classes != names:
        raise ValueError(f"{classes_path} names other classes ({old_classes[:3]}...) than this source "
                         f"({names[:3]}...): write these shards to another folder")
    # the shards this command writes at least (by count): an existing one stops it before any is written
    taken = [Path(cfg.output % i) for i in range(max(1, -(-len(samples) // cfg.shard.max_count)))
             if Path(cfg.output % i).exists()]
    if taken:
        raise ValueError(f"{taken[0]} exists: shards are never replaced; pass another --output or remove the old "
                         f"shards (and their entries in {sizes_path})")
    start, t0, total_bytes, shard, written = 0, time.perf_counter(), 0, 0, {}
    bar = tqdm(total=len(samples), unit="img", disable=not progress or None, desc="shards")
    width = len(str(len(samples)))
    try:
        while start < len(samples):
            path = Path(cfg.output % shard)
            if path.exists():
                raise ValueError(f"{path} exists: shards are never replaced; pass another --output")
            count = [0, 0]  # samples, bytes

            def write(tmp: Path, start: int = start, count: list = count) -> None:
                with TarWriter(str(tmp), encoder=False, mtime=0) as tar:
                    for _, suffix, item, label in samples[start:]:
                        data = _payload(item)
                        if count[0] >= cfg.shard.max_count or (count[0] and count[1] + len(data) >
                                                               cfg.shard.max_size):
                            break
                        sample = {"__key__": f"{start + count[0]:0{width}d}", suffix: data}
                        if label >= 0:
                            sample["cls"] = str(label).encode()
                        tar.write(sample)
                        count[0] += 1
                        count[1] += len(data)
                        bar.update(1)

            try:
                atomic_write(path, write, disk_full_fix="free space or pass another --output")
            except OSError as e:
                if isinstance(e, DiskFullError):
                    raise
                raise ValueError(f"cannot write {path} ({e.strerror or e}); pass an --output in a folder you can "
                                 f"write") from None
            written[path.name] = count[0]
            total_bytes += count[1]
            start += count[0]
            shard += 1
        sizes.update(written)
        atomic_write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n", sizes_path)
        if old_classes is None:
            atomic_write_text(json.dumps(names) + "\n", classes_path)
    except BaseException:  # a stop, a full disk, an unreadable file: the set is incomplete, so none of it stays
        for name in written:
            (folder / name).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return {"shards": shard, "samples": len(samples), "bytes": total_bytes, "missing": missing,
            "seconds": time.perf_counter() - t0, "folder": str(folder)}


def run_shard(cfg: ShardConfig) -> dict:
    validate(cfg)
    summary = write_shards(cfg)
    pattern = FIELD.sub(lambda m: "%" if m.group(0) == "%%" else "{" + "..".join(
        f"{i:0{int(m.group(1) or 0)}d}" for i in (0, summary["shards"] - 1)) + "}", cfg.output)
    gone = f", {summary['missing']} listed files missing (skipped)" if summary["missing"] else ""
    print(f"wrote {summary['samples']:,} samples in {summary['shards']} shards ({summary['bytes'] / 1e6:.1f} MB of "
          f"images) to {summary['folder']} in {summary['seconds']:.1f} s{gone}; train on them with "
          f"--data.source shards --data.path '{pattern}'", flush=True)
    return summary
