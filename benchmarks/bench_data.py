"""Data pipeline throughput: training images/s, to set against the model's images/s.

(F) Fashion-MNIST-shaped in-memory data (uint8 28x28), batched crop + flip + normalise in the main process.
(J) JPEG files (500x375 RGB, the size of a typical ImageNet photo) decoded with Pillow, RandomResizedCrop
    to 224, flip, normalise, through `fastmae.data.build_loader` (source 'unlabelled'): with --workers 0 one
    worker process's rate; with --workers N (e.g. 16 on a GPU machine) the loader's rate as training uses it.

(D) One worker's decode + RandomResizedCrop to 224 of generated JPEGs, three paths interleaved in one process,
    --repeats times; median images/s of each, per JPEG size: the reference (`reference_load_image`, the per-file
    transform as it was when issue #12 was filed), load_image resizing with Pillow only (torch_resize=False; the
    default until torch's uint8 resize was adopted) and today's default (reduced-size JPEG decode where the crop
    allows, torch's uint8 resize where the CPU has AVX2/AVX-512). Same seeds: same boxes.

    python benchmarks/bench_data.py [--files 256] [--epochs 2]
    python benchmarks/bench_data.py --decode-only --decode-sizes 500x375,1024x768,2048x1536 --repeats 7
    python benchmarks/bench_data.py --decode-only --decode-content photo --decode-sizes 500x375,2048x1536
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
from PIL import Image, ImageOps

from fastmae.config import DataConfig
from fastmae.data import (
    MemoryLoader,
    build_loader,
    decode,
    load_image,
    normalize,
    sample_crop_boxes,
)
from fastmae.data.transforms import CROP_RATIO

JPEG_SIZE = (500, 375)  # width, height
DECODE_SIZES = "500x375,1024x768,2048x1536"  # (D)'s JPEG sizes with --decode-only


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


def write_jpeg(path: str, seed: int, size: tuple[int, int] = JPEG_SIZE) -> None:
    """One RGB JPEG of size (w, h), quality 90: noise over a horizontal ramp, so it is not trivially compressible."""
    g = np.random.default_rng(seed)
    w, h = size
    arr = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr = (arr // 4 + np.linspace(0, 190, w, dtype=np.uint8)[None, :, None]).astype(np.uint8)  # some structure
    Image.fromarray(arr).save(path, quality=90)


def write_photo_jpeg(path: str, seed: int, size: tuple[int, int] = JPEG_SIZE) -> None:
    """One RGB JPEG of size (w, h), quality 90, closer to a photo: smooth colour waves, sharp discs, mild grain."""
    g = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    arr = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (g.uniform(0.5, 3) * x + g.uniform(0.5, 3) * y) + g.uniform(0, 6))
                    for _ in range(3)], -1)  # (h, w, 3)
    for _ in range(8):
        cy, cx, r = g.uniform(0, 1, 3) * (h / max(w, h), w / max(w, h), 0.15)
        arr[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = g.uniform(0, 1, 3)
    arr += g.normal(0, 0.03, (h, w, 1))  # grain
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)


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


def reference_load_image(path: str, mean, std, generator: torch.Generator) -> torch.Tensor:
    """(D)'s reference: load_image's train transform for an RGB file as it was when issue #12 was filed.

    Full decode, the EXIF-transposed copy, the crop box by the batched tensor rule, Pillow bicubic to 224,
    the flip, float conversion with cat and clamp, then normalize: same boxes and pixels as today's full decode
    resized by Pillow (load_image(fast_jpeg=False, torch_resize=False)).
    """
    img = Image.open(path)
    img.load()
    img = ImageOps.exif_transpose(img)
    img = img if img.mode == "RGB" else img.convert("RGB")
    top, left, h, w = sample_crop_boxes(1, img.height, img.width, (0.2, 1.0), CROP_RATIO, generator)[0].tolist()
    flip = bool(torch.rand((), generator=generator) < 0.5)
    img = img.resize((224, 224), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255.0)  # (3, 224, 224)
    return normalize(torch.cat([x]).clamp_(0.0, 1.0), mean, std)


PATHS = ("reference", "pillow", "default")  # (D): reference_load_image, load_image(torch_resize=False), load_image


def decode_rates(paths: list[str], repeats: int) -> dict:
    """(D): one process's images/s over `paths` (train, 224) of the reference, today's load_image resizing with
    Pillow only, and today's default.

    The three run in turn (the order rotates every pass), `repeats` times each, after one warm-up pass of each;
    the same seeds, so all draw the same crop boxes. Medians and the ratios of medians.
    """
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def one_pass(which: str) -> float:
        t0 = time.perf_counter()
        for i, p in enumerate(paths):
            g = torch.Generator().manual_seed(i)
            if which == "reference":
                reference_load_image(p, mean, std, g)
            else:
                load_image(p, (224, 224), 3, mean, std, train=True, generator=g,
                           torch_resize=False if which == "pillow" else None)
        return len(paths) / (time.perf_counter() - t0)

    for which in PATHS:  # warm-up
        one_pass(which)
    rates: dict[str, list[float]] = {which: [] for which in PATHS}
    for r in range(repeats):
        for which in PATHS[r % 3:] + PATHS[: r % 3]:
            rates[which].append(one_pass(which))
    med = {which: float(np.median(runs)) for which, runs in rates.items()}
    return {"reference_img_per_s": med["reference"], "pillow_img_per_s": med["pillow"],
            "default_img_per_s": med["default"], "ratio": med["default"] / med["reference"],
            "torch_vs_pillow_resize": med["default"] / med["pillow"], "torch_resize": decode.TORCH_RESIZE,
            **{f"{which}_runs": runs for which, runs in rates.items()}}


def decode_rows(sizes: list[tuple[int, int]], files: int, repeats: int, content: str = "noise") -> list[dict]:
    """(D) rows: for each JPEG size, `files` generated JPEGs ('noise': write_jpeg, 'photo': write_photo_jpeg)."""
    write = write_photo_jpeg if content == "photo" else write_jpeg
    rows = []
    for w, h in sizes:
        with tempfile.TemporaryDirectory() as d:
            paths = [str(Path(d) / f"{i:05d}.jpg") for i in range(files)]
            for i, p in enumerate(paths):
                write(p, i, (w, h))
            kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
            r = decode_rates(paths, repeats)
        rows.append({"pipeline": "D", "title": f"D: {content} JPEG {w}x{h} ({kb:.0f} KB) -> 224 px, one process",
                     "size": [w, h], "content": content, "kb": kb, "files": files, "repeats": repeats, **r})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=256, help="JPEGs to generate (use a multiple of batch x workers)")
    p.add_argument("--epochs", type=int, default=2, help="timed passes over the data, after one warm-up pass")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes (0: decode in this process)")
    p.add_argument("--batch", type=int, default=32, help="JPEG loader batch size")
    p.add_argument("--jpeg-only", action="store_true", help="skip the in-memory Fashion-MNIST row")
    p.add_argument("--gen-procs", type=int, default=0, help="processes writing the JPEGs (0: one per core, <= 16)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    p.add_argument("--decode-only", action="store_true", help="only (D): the per-file transform, three ways")
    p.add_argument("--decode-sizes", default="",
                   help=f"(D) JPEG sizes WxH, comma-separated (default: none, or {DECODE_SIZES} with --decode-only)")
    p.add_argument("--decode-files", type=int, default=64, help="(D) JPEGs per size")
    p.add_argument("--repeats", type=int, default=5, help="(D) timed passes of each path, interleaved")
    p.add_argument("--decode-content", default="noise", choices=["noise", "photo"],
                   help="(D) noise over a ramp (as (J)) or photo-like (smooth waves, discs, grain)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    if not (args.jpeg_only or args.decode_only):
        rows.append({"pipeline": "F", "title": "F: Fashion-MNIST in memory, 28 px, batch 256", "workers": 0,
                     "img_per_s": memory_rate(args.epochs)})
    if not args.decode_only:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            make_jpegs(d, args.files, args.gen_procs)
            made_s = time.perf_counter() - t0
            who = f"{args.workers} workers" if args.workers else "one worker"
            rows.append({"pipeline": "J", "title": f"J: JPEG 500x375 -> 224 px, {who}, batch {args.batch}",
                         "workers": args.workers, "batch": args.batch, "files": args.files,
                         "img_per_s": jpeg_rate(d, args.workers, args.batch, args.epochs), "jpeg_write_s": made_s})
    if rows:
        print("| pipeline | train images/s | per worker |\n| --- | ---: | ---: |")
        for r in rows:
            print(f"| {r['title']} | {r['img_per_s']:.0f} | {r['img_per_s'] / max(r['workers'], 1):.0f} |")
    spec = args.decode_sizes or (DECODE_SIZES if args.decode_only else "")
    sizes = [tuple(int(v) for v in s.split("x")) for s in spec.split(",") if s]
    decode = decode_rows(sizes, args.decode_files, args.repeats, args.decode_content) if sizes else []
    if decode:
        print(f"\n| (D) decode + RandomResizedCrop 224, one process, median of {args.repeats} | reference img/s "
              f"| today, Pillow resize | today (default) | default vs reference | torch vs Pillow resize |\n"
              f"| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in decode:
            print(f"| {r['title']} | {r['reference_img_per_s']:.0f} | {r['pillow_img_per_s']:.0f} | "
                  f"{r['default_img_per_s']:.0f} | {r['ratio']:.2f}x | {r['torch_vs_pillow_resize']:.2f}x |")
    if args.json:
        info = {"cpus": os.cpu_count(), "torch": torch.__version__, "epochs": args.epochs}
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows + decode}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
