"""Data pipeline throughput: training images/s per worker, to set against the model's images/s.

(F) Fashion-MNIST-shaped in-memory data (uint8 28x28), batched crop + flip + normalise in the main process.
(J) JPEG files (500x375 RGB, the size of a typical ImageNet photo) decoded with Pillow, RandomResizedCrop
    to 224, flip, normalise: one worker process's rate (num_workers=0 measures exactly one worker).

    python benchmarks/bench_data.py [--files 256] [--epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastmae.config import DataConfig
from fastmae.data import MemoryLoader, build_loader


def rate(loader, epochs: int) -> float:
    """Images/s over `epochs` full passes (after one warm-up pass)."""
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = np.random.default_rng(0)
    images = torch.from_numpy(g.integers(0, 256, (60000, 1, 28, 28), dtype=np.uint8))
    mem = MemoryLoader(images, torch.zeros(60000, dtype=torch.long), img_size=(28, 28), batch_size=256, train=True,
                       channels=1, mean=(0.286,), std=(0.353,), crop_scale=(0.2, 1.0))
    rows = [("F: Fashion-MNIST in memory, 28 px, batch 256", rate(mem, args.epochs))]
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.files):
            arr = g.integers(0, 256, (375, 500, 3), dtype=np.uint8)
            arr = (arr // 4 + np.linspace(0, 190, 500, dtype=np.uint8)[None, :, None]).astype(np.uint8)  # some structure
            Image.fromarray(arr).save(Path(d) / f"{i:05d}.jpg", quality=90)
        cfg = DataConfig(source="unlabelled", path=d, num_workers=0)
        files = build_loader(cfg, "train", (224, 224), 32, train=True)
        rows.append(("J: JPEG 500x375 -> 224 px, one worker, batch 32", rate(files, args.epochs)))
    print("| pipeline | train images/s per worker |\n| --- | ---: |")
    for name, r in rows:
        print(f"| {name} | {r:.0f} |")


if __name__ == "__main__":
    main()
