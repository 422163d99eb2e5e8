"""Segmentation benchmark on Fashion-MNIST scenes: does MAE pretraining help `fastmae segment`? mIoU with wall time.

Rows: a raw-pixel baseline (a small conv net on the pixels at full resolution, trained with the same data,
loss, optimiser, schedule and epochs as the heads: benchmark-only, not a `--init` choice), then `fastmae
segment` with the linear and fpn heads on a frozen encoder and fine-tuned (--finetune), each from the MAE
checkpoint given by --init and from random init. Every row runs the real CLI (or the same trainer) in this
process. Run on a quiet machine:

    python benchmarks/bench_segment.py --init runs/pretrain --out runs/bench_segment [--rows pixels,linear,fpn,finetune]
        [--inits mae,random]

Extra `fastmae segment` flags for every row go after `--`, e.g. `-- --seg.train_scenes 2000 --optim.epochs 3`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch.nn as nn
import torch.nn.functional as F
import tyro

from fastmae.cli import main as fastmae_main
from fastmae.commands.segment import SegEvaluator, SegmentConfig, seg_splits
from fastmae.data.build import source_norm_stats
from fastmae.data.segmentation import SegLoader
from fastmae.train.dense import inference
from fastmae.train.engine import Task
from fastmae.train.optim import build_adamw, param_groups_weight_decay, schedule
from fastmae.train.trainer import fit, model_meta, setup

ROWS = ("pixels", "linear", "fpn", "finetune")


class PixelNet(nn.Module):
    """Three 3x3 conv + BN + GELU layers (receptive field 7x7) and a 1x1 classifier on the raw pixels."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(channels if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU()]
        self.body = nn.Sequential(*layers, nn.Conv2d(width, num_classes, 1))

    def forward(self, x):
        return self.body(x)  # (B, K, H, W)


def pixel_baseline(args: list[str], out: Path) -> dict:
    """PixelNet trained and scored like a `fastmae segment` head (same flags, data, schedule, metric)."""
    cfg = tyro.cli(SegmentConfig, args=[*args, "--run.output_dir", str(out)], use_underscores=True)
    rt = setup(cfg.run, cfg)
    channels = cfg.data.channels or 1
    train, val, classes, K = seg_splits(cfg.data, cfg.seg, channels, cfg.run.seed)
    mean, std = source_norm_stats(cfg.data, channels)
    common = dict(channels=channels, mean=mean, std=std, hflip=cfg.data.hflip, seed=cfg.run.seed,
                  batch_size=cfg.optim.batch_size, num_classes=K)
    loader, val_loader = SegLoader(train, train=True, **common), SegLoader(val, train=False, drop_last=False, **common)
    model = PixelNet(channels, K).to(rt.device)
    lr = schedule(cfg.optim, len(loader))
    opt = build_adamw(param_groups_weight_decay(model, cfg.optim.weight_decay), lr.peak, cfg.optim.betas, rt.device)
    task = Task(model, opt, loss=lambda m, x, y: F.cross_entropy(m(x).float(), y, ignore_index=cfg.seg.ignore_index),
                lr=lr, meta=model_meta("pixelnet", {}, cfg))
    fit(rt, task, loader, cfg.optim.epochs)
    scorer = SimpleNamespace(predict=lambda logits: logits.argmax(1), ignore_index=cfg.seg.ignore_index)
    return inference(model, model, val_loader, SegEvaluator(scorer, classes, rt), rt.device, rt.precision)[1]


def cli(args: list[str]) -> dict:
    print("+ fastmae " + " ".join(args), flush=True)
    if fastmae_main(args) != 0:
        raise SystemExit(f"fastmae {args[0]} failed")
    out = Path(args[args.index("--run.output_dir") + 1])
    return json.loads((out / "segment.json").read_text())


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="the MAE checkpoint or run folder to compare with random init")
    p.add_argument("--out", default="runs/bench_segment")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--inits", default="mae,random", help="which encoders the head rows use: mae, random or both")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    common = ["--run.no_progress", *extra]
    for row in a.rows.split(","):
        if row == "pixels":
            runs = {"pixels": lambda: pixel_baseline(common, out / "pixels")}
        else:
            head = ["--head", "fpn" if row == "fpn" else "linear"] + (["--finetune"] if row == "finetune" else [])
            runs = {f"{row}/{name}": (lambda init=init, name=name, head=head: cli(
                ["segment", "--init", init, *head, "--run.output_dir", str(out / f"{row}_{name}"), *common]))
                for name, init in (("mae", a.init), ("random", "random")) if name in a.inits.split(",")}
        for key, fn in runs.items():
            t0 = time.perf_counter()
            res = fn()
            results[key] = {"miou": res["miou"], "pixel_acc": res["pixel_acc"], "seconds": time.perf_counter() - t0}
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{key}: mIoU {res['miou']:.2f}%  pixel acc {res['pixel_acc']:.2f}%", flush=True)
    print("| row | mIoU % | pixel acc % | wall s |\n|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {r['miou']:.2f} | {r['pixel_acc']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
