"""Quality benchmark on Fashion-MNIST: does MAE pretraining help? Test top-1 with wall time.

Rows: kNN and a linear classifier on raw pixels; linear probe and kNN of a randomly initialised
encoder; the default `fastmae pretrain` run, then linear probe, kNN and fine-tuning from it;
fine-tuning from random init with the same schedule. Every row runs the real CLI in this process
and its wall time is measured. Run one at a time on a quiet machine:

    python benchmarks/bench_fmnist.py --out runs/bench_fmnist [--steps raw,random,pretrain,probe,finetune]

Extra pretrain flags go after `--`, e.g. `-- --optim.epochs 10 --model.mask_ratio 0.5`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastmae.cli import main as fastmae_main
from fastmae.commands.linprobe import (
    LinprobeConfig,
    head_accuracy,
    train_head_on_features,
)
from fastmae.config import DataConfig
from fastmae.data import build_loader
from fastmae.metrics.knn import knn_accuracy
from fastmae.models.heads import LinearHead

STEPS = ("raw", "random", "pretrain", "probe", "finetune")


def timed(fn, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def cli(args: list[str]) -> None:
    print("+ fastmae " + " ".join(args), flush=True)
    code = fastmae_main(args)
    if code != 0:
        raise SystemExit(f"fastmae {args[0]} failed with exit code {code}")


def raw_pixels(data: DataConfig) -> dict:
    """kNN (k=20, T=0.07, cosine) and the `fastmae linprobe` head and schedule on normalised raw pixels."""
    feats = {}
    for split in ("train", "eval"):
        loader = build_loader(data, split, (28, 28), 1024, train=False, drop_last=False)
        loader.set_epoch(0)
        xs, ys = zip(*loader)
        feats[split] = (torch.cat(xs).flatten(1), torch.cat(ys))  # (N, 784), (N,)
    knn, knn_s = timed(lambda: knn_accuracy(*feats["train"], *feats["eval"], num_classes=10))
    head = LinearHead(784, 10)
    o = LinprobeConfig().optim  # the linprobe command's defaults: same head, LARS, lr and schedule
    _, lin_s = timed(lambda: train_head_on_features(head, *feats["train"], o, world_size=1, seed=0))
    lin = head_accuracy(head, *feats["eval"])
    return {"raw kNN": (knn["top1"], knn_s), "raw linear": (lin["top1"], lin_s)}


def read(path: Path, key: str) -> float:
    return float(json.loads(path.read_text())[key])


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_fmnist")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--finetune_epochs", type=int, default=10)
    p.add_argument("--finetune_warmup", type=float, default=1.0, help="warmup epochs of both fine-tune rows")
    p.add_argument("--finetune_flags", default="",
                   help="extra flags for both fine-tune rows, space separated, e.g. '--aug.mixup 0 --aug.cutmix 0'")
    p.add_argument("--probe_epochs", type=int, default=90)
    p.add_argument("--arch", default="vit_tiny_d6_patch4", help="ViT variant for the random-init rows (= the pretrain default)")
    p.add_argument("--arch_flags", default="", help="extra --model.* flags for random-init rows (comma separated)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    rows: dict[str, tuple[float, float]] = {}
    results_path = out / "results.json"
    if results_path.exists():
        rows.update({k: tuple(v) for k, v in json.loads(results_path.read_text()).items()})
    pre = out / "pretrain"
    probe = ["--optim.epochs", str(args.probe_epochs), "--run.no_progress", "--overwrite"]  # a step run again re-measures
    ft = ["--optim.epochs", str(args.finetune_epochs), "--optim.warmup_epochs", str(args.finetune_warmup),
          "--run.no_progress", *args.finetune_flags.split()]
    rand = ["--init", "random", "--model.name", args.arch] + [f for f in args.arch_flags.split(",") if f]

    def save() -> None:
        results_path.write_text(json.dumps(rows, indent=2))

    if "raw" in steps:
        rows.update(raw_pixels(DataConfig()))
        save()
    if "random" in steps:
        _, s = timed(cli, ["linprobe", *rand, *probe, "--run.output_dir", str(out / "lp_random")])
        rows["random encoder linear probe"] = (read(out / "lp_random" / "linprobe.json", "top1"), s)
        _, s = timed(cli, ["knn", *rand, "--knn.overwrite", "--run.output_dir", str(out / "knn_random")])
        rows["random encoder kNN"] = (read(out / "knn_random" / "knn.json", "top1"), s)
        save()
    if "pretrain" in steps:
        _, s = timed(cli, ["pretrain", "--run.output_dir", str(pre), "--run.no_progress", *extra])
        last = [json.loads(line) for line in (pre / "log.jsonl").read_text().splitlines() if '"loss"' in line][-1]
        rows["MAE pretrain (final loss; kNN in log)"] = (last["loss"], s)
        save()
    if "probe" in steps:
        _, s = timed(cli, ["linprobe", "--init", str(pre), *probe, "--run.output_dir", str(out / "lp_mae")])
        rows["MAE linear probe"] = (read(out / "lp_mae" / "linprobe.json", "top1"), s)
        _, s = timed(cli, ["knn", "--init", str(pre), "--knn.overwrite", "--run.output_dir", str(out / "knn_mae")])
        rows["MAE kNN"] = (read(out / "knn_mae" / "knn.json", "top1"), s)
        save()
    if "finetune" in steps:
        _, s = timed(cli, ["finetune", "--init", str(pre), *ft, "--run.output_dir", str(out / "ft_mae")])
        rows[f"MAE fine-tune ({args.finetune_epochs} ep)"] = (read(out / "ft_mae" / "finetune.json", "top1"), s)
        _, s = timed(cli, ["finetune", *rand, *ft, "--run.output_dir", str(out / "ft_random")])
        rows[f"scratch fine-tune ({args.finetune_epochs} ep)"] = (read(out / "ft_random" / "finetune.json", "top1"), s)
        save()
    print("\n| row | test top-1 (%) | wall time (s) |\n| --- | ---: | ---: |")
    for name, (acc, secs) in rows.items():
        print(f"| {name} | {acc:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
