"""`fastmae embed`: encoder features of a dataset written to disk, for heads, retrieval or clustering elsewhere.

Shapes: N samples, D width, h, w patch grid. Per split, one file: `features` (N, D) for avg/token pooling or
(N, D, h, w) for dense, `labels` (N,) when the source is labelled, and the row order: image sources list their
files in SPLIT.txt (line i = row i; `name_line` says how names are written; tar shards: SHARD#N); Fashion-MNIST
rows are the split's indices 0..N-1 (metadata says so).
The encoder and features are computed as in `fastmae knn` / `linprobe` (`probe_encoder`, `features_of`); the default
pool is the cls token here, while knn's `auto` takes every patch token on small grids, else their mean.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..config import POSITIVE_INT, DataConfig, EncoderConfig, Rule, RunConfig, validate
from ..data import has_eval_split
from ..data.decode import UnreadableImageError
from ..train.dist import print0
from ..train.probe import features_of, probe_encoder
from ..train.results import refuse_replacing
from ..train.trainer import setup, write_config
from ..weights.checkpoint import atomic_write, atomic_write_text

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae embed --help`).

@dataclass(frozen=True)
class EmbedParams:
    """Which features, of which split, in which file format."""

    RULES: ClassVar[dict[str, Rule]] = {"pool": ((lambda v: v in ("avg", "token", "dense")), "one of avg, token, dense"),
                  "split": ((lambda v: v in ("train", "eval", "both")), "one of train, eval, both"),
                  "format": ((lambda v: v in ("safetensors", "npy")), "one of safetensors, npy"),
                  "batch_size": POSITIVE_INT}

    pool: str = "token"
    """avg: mean of the patch tokens after the final norm (N, D); token: the cls token (N, D); dense: the
    patch-token maps (N, D, h, w)."""
    split: str = "both"
    """train, eval or both (each split is one file)."""
    format: str = "safetensors"
    """safetensors: SPLIT.safetensors with 'features' and 'labels'; npy: SPLIT.features.npy and SPLIT.labels.npy.
    Image files are listed in SPLIT.txt in row order (Fashion-MNIST rows are the split's indices 0..N-1)."""
    overwrite: bool = False
    """Replace existing outputs (otherwise an existing file stops the command before any work)."""
    batch_size: int = 256
    """Images per batch."""


@dataclass(frozen=True)
class EmbedConfig:
    """Write encoder features of a dataset to disk (your own heads, retrieval, clustering): features, labels, files.

    fastmae embed --init runs/pretrain --embed.pool avg --run.output_dir runs/embed   (train.safetensors, eval.safetensors)
    """

    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, a released name (mae_pretrain_vit_base), or 'random'."""
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    """The encoder (--model.img_size: inputs at another size, positions resampled)."""
    embed: EmbedParams = field(default_factory=lambda: EmbedParams())
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/embed"))


def split_names(split: str) -> tuple[str, ...]:
    """'both' -> ('train', 'eval'); else the one split."""
    return ("train", "eval") if split == "both" else (split,)


def output_files(out_dir: Path, split: str, fmt: str) -> list[Path]:
    """The files a split writes (the .txt file list is written only for image-file sources)."""
    if fmt == "npy":
        return [out_dir / f"{split}.features.npy", out_dir / f"{split}.labels.npy"]
    return [out_dir / f"{split}.safetensors"]


def check_outputs(cfg: EmbedConfig) -> None:
    """Refuse to run over existing outputs without --embed.overwrite (before any work), and --data.skip_corrupt,
    whose substitutes for unreadable files would break the one-row-per-file list."""
    out = Path(cfg.run.output_dir)
    if not cfg.embed.overwrite:
        refuse_replacing((p for s in split_names(cfg.embed.split)
                          for p in output_files(out, s, cfg.embed.format) + [out / f"{s}.txt"]), "--embed.overwrite")
    if "eval" in split_names(cfg.embed.split) and not has_eval_split(cfg.data):
        raise ValueError(f"--embed.split {cfg.embed.split} needs evaluation data, which --data.source "
                         f"{cfg.data.source} has only with --data.eval_path (or --data.holdout); pass one, or "
                         f"--embed.split train")
    if cfg.data.skip_corrupt:
        raise ValueError("--data.skip_corrupt cannot be used with embed (a skipped file's row would hold another "
                         "image); fix or remove the unreadable files")


def row_names(loader) -> list[str] | None:
    """The image file of each row (the loader's sample order; tar shards: SHARD#N, the shard's N-th image from 0),
    or None for in-memory sources."""
    if hasattr(loader, "sample_names"):
        return loader.sample_names()
    dataset = getattr(loader, "dataset", None)
    return [str(path) for path, _ in dataset.samples] if dataset is not None else None


def name_line(name: str) -> bytes:
    """One line of SPLIT.txt: the file's name as the file system stores it (any bytes, whatever the locale), with a
    backslash, newline or carriage return in it written as \\, \\n, \\r so that every row stays one line."""
    raw = os.fsencode(name).replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return raw + b"\n"


def write_split(out_dir: Path, split: str, fmt: str, feats: torch.Tensor, labels: torch.Tensor | None,
                files: list[str] | None, meta: dict) -> list[Path]:
    """Write one split's features (+ labels, + file list) atomically; returns the paths written."""
    feats = feats.float().contiguous().cpu()
    written = []
    if fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {"features": feats}
        if labels is not None:
            tensors["labels"] = labels.long().contiguous().cpu()
        info = {k: json.dumps(v) for k, v in meta.items()}  # safetensors metadata holds strings only
        written.append(atomic_write(out_dir / f"{split}.safetensors", lambda tmp: save_file(tensors, str(tmp), info)))
    else:
        def save_npy(arr: np.ndarray):
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a temp name
                    np.save(f, arr)
            return write

        written.append(atomic_write(out_dir / f"{split}.features.npy", save_npy(feats.numpy())))
        if labels is not None:
            written.append(atomic_write(out_dir / f"{split}.labels.npy", save_npy(labels.long().cpu().numpy())))
        written.append(atomic_write_text(json.dumps(meta, indent=2, sort_keys=True), out_dir / f"{split}.json"))
    if files is not None:
        lines = b"".join(name_line(f) for f in files)
        written.append(atomic_write(out_dir / f"{split}.txt", lambda tmp: tmp.write_bytes(lines)))
    return written


def run_embed(cfg: EmbedConfig) -> list[Path]:
    """Extract and write the features of the chosen splits; returns the files written."""
    validate(cfg)
    check_outputs(cfg)
    rt = setup(cfg.run, cfg, write_config=False)  # written with the features: a failed run changes nothing
    if rt.dist.world_size > 1:  # gathered rows interleave ranks and wrap-around padding: no one row per file
        raise ValueError("fastmae embed runs in one process; start it without torchrun")
    t0 = time.perf_counter()
    data = cfg.data
    if cfg.embed.split == "train" and data.source != "fashion-mnist" and not data.eval_path:
        data = dataclasses.replace(data, eval_path=data.path)  # probe_encoder indexes an eval split; unused here
    encoder, train, val, _ = probe_encoder(cfg.init, cfg.model, data, rt, cfg.embed.batch_size)
    computed = []  # every split's features before any file is written: a split that fails leaves the folder as it was
    for split, loader in (("train", train), ("eval", val)):
        if split not in split_names(cfg.embed.split):
            continue
        try:
            with torch.no_grad():
                feats, labels = features_of(encoder, loader, cfg.embed.pool, rt)  # (N, D) or (N, D, h, w); (N,)
        except UnreadableImageError as e:  # embed cannot skip a file (one row per file)
            raise e.without_skip_hint() from None
        files = row_names(loader)
        meta = {"init": cfg.init, "pool": cfg.embed.pool, "split": split, "source": cfg.data.source,
                "path": cfg.data.path if split == "train" else (cfg.data.eval_path or cfg.data.path),
                "rows": (f"samples in {split}.txt (SHARD#N: the shard's N-th image, from 0)" if data.source == "shards"
                         else f"files in {split}.txt") if files is not None else
                        f"{cfg.data.source} {split} indices 0..N-1",
                "shape": list(feats.shape), "classes": list(loader.classes)}
        computed.append((split, feats, labels if loader.num_classes > 0 else None, files, meta))
    written: list[Path] = []
    if rt.dist.is_main:
        for split, feats, labels, files, meta in computed:
            written += write_split(rt.out_dir, split, cfg.embed.format, feats, labels, files, meta)
            print0(rt.dist, f"{split}: features {tuple(feats.shape)} ({cfg.embed.pool}) -> {written[-1].parent}")
        written.append(write_config(rt))
    print0(rt.dist, f"done in {time.perf_counter() - t0:.0f}s: {', '.join(p.name for p in written)}")
    return written


__all__ = ["run_embed"]
