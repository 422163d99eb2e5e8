"""Data pipeline throughput: training images/s, to set against the model's images/s.

(F) Fashion-MNIST-shaped in-memory data (uint8 28x28), batched crop + flip + normalise in the main process.
(J) JPEG files (500x375 RGB, the size of a typical ImageNet photo) decoded with Pillow, RandomResizedCrop
    to 224, flip, normalise, through `fastmae.data.build_loader` (source 'unlabelled'): with --workers 0 one
    worker process's rate; with --workers N (e.g. 16 on a GPU machine) the loader's rate as training uses it.

    python benchmarks/bench_data.py [--files 256] [--epochs 2]
    python benchmarks/bench_data.py --jpeg-only --files 4096 --workers 16 --batch 256 --json data.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `fastmae` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from fastmae.config import DataConfig
from fastmae.data import MemoryLoader, build_loader

JPEG_SIZE = (500, 375)  # width, height


def rate(loader, epochs: int) -> float:
    """Images/s over `epochs` full passes (after one warm-up pass, which also starts the workers)."""
    n = 0
    loader.set_epoch(0)
    for _ in loader:
        pass
    t0 = time.perf_counter()
    for e in range(1, epochs + 1):
        loader.set_epoch(e)
        for x, _ in loader:
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def write_jpeg(path: str, seed: int) -> None:
    """One 500x375 RGB JPEG (quality 90): noise over a horizontal ramp, so it is not trivially compressible."""
    g = np.random.default_rng(seed)
    w, h = JPEG_SIZE
    arr = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr = (arr // 4 + np.linspace(0, 190, w, dtype=np.uint8)[None, :, None]).astype(np.uint8)  # some structure
    Image.fromarray(arr).save(path, quality=90)


def _write_jpeg_args(args: tuple[str, int]) -> None:
    write_jpeg(*args)


def make_jpegs(folder: str | Path, n: int, procs: int = 0) -> None:
    """n JPEGs named 00000.jpg... in `folder`, written by `procs` processes (0: one per CPU core, at most 16)."""
    jobs = [(str(Path(folder) / f"{i:05d}.jpg"), i) for i in range(n)]
    procs = procs or min(16, os.cpu_count() or 1)
    if procs <= 1 or n < 64:
        for job in jobs:
            _write_jpeg_args(job)
        return
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pool.map(_write_jpeg_args, jobs, chunksize=32)


def memory_rate(epochs: int) -> float:
    """(F): the Fashion-MNIST-shaped in-memory loader's training images/s (60,000 random images, batch 256)."""
    g = np.random.default_rng(0)
    images = torch.from_numpy(g.integers(0, 256, (60000, 1, 28, 28), dtype=np.uint8))
    mem = MemoryLoader(images, torch.zeros(60000, dtype=torch.long), img_size=(28, 28), batch_size=256, train=True,
                       channels=1, mean=(0.286,), std=(0.353,), crop_scale=(0.2, 1.0))
    return rate(mem, epochs)


def jpeg_rate(folder: str | Path, workers: int, batch: int, epochs: int) -> float:
    """(J): build_loader's training images/s on the JPEGs in `folder`, at 224 px with `workers` workers."""
    cfg = DataConfig(source="unlabelled", path=str(folder), num_workers=workers)
    loader = build_loader(cfg, "train", (224, 224), batch, train=True)
    return rate(loader, epochs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=256, help="JPEGs to generate (use a multiple of batch x workers)")
    p.add_argument("--epochs", type=int, default=2, help="timed passes over the data, after one warm-up pass")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes (0: decode in this process)")
    p.add_argument("--batch", type=int, default=32, help="JPEG loader batch size")
    p.add_argument("--jpeg-only", action="store_true", help="skip the in-memory Fashion-MNIST row")
    p.add_argument("--gen-procs", type=int, default=0, help="processes writing the JPEGs (0: one per core, <= 16)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    if not args.jpeg_only:
        rows.append({"pipeline": "F", "title": "F: Fashion-MNIST in memory, 28 px, batch 256", "workers": 0,
                     "img_per_s": memory_rate(args.epochs)})
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        make_jpegs(d, args.files, args.gen_procs)
        made_s = time.perf_counter() - t0
        who = f"{args.workers} workers" if args.workers else "one worker"
        rows.append({"pipeline": "J", "title": f"J: JPEG 500x375 -> 224 px, {who}, batch {args.batch}",
                     "workers": args.workers, "batch": args.batch, "files": args.files,
                     "img_per_s": jpeg_rate(d, args.workers, args.batch, args.epochs), "jpeg_write_s": made_s})
    print("| pipeline | train images/s | per worker |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['title']} | {r['img_per_s']:.0f} | {r['img_per_s'] / max(r['workers'], 1):.0f} |")
    if args.json:
        info = {"cpus": os.cpu_count(), "torch": torch.__version__, "epochs": args.epochs}
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
