"""Which encoder features (and which kNN) are best on Fashion-MNIST? Chosen on a held-out slice of train, never on test.

For a pretrained run folder: the kNN top-1 (k=20, T=0.07, cosine) and optionally the linear-probe top-1 of several
feature choices: the mean of the patch tokens or the cls token of the last block, the mean over the last k blocks of
each block's mean patch token, each after the encoder's final norm (as timm's forward_intermediates) or before it
('-raw'); with --grids, region means of the last block's tokens on a g x g grid, flattened ('gridG-last1'; g = the
patch grid is every token, `--model.global_pool tokens`); kNN on the features as they are or centred (the memory's
mean subtracted before the cosine, '+c'). 'pixels' (the normalised images, flattened) is the raw-pixel reference;
--random scores a freshly initialised encoder of the same shape instead (the control for what pretraining adds).

Selection split: the last --holdout training images are the queries (kNN) or the evaluation set (probe), the first
60,000 - holdout the memory or training set. The test split is scored only for the choices passed with --report, with
all 60,000 training images, so those numbers were not tuned on it. Runs in the precision `--run.precision auto` picks.

    python benchmarks/bench_features.py --init runs/pretrain                        # selection table
    python benchmarks/bench_features.py --init runs/pretrain --blocks 1 --grids 3,7 --probe 1   # + probes
    python benchmarks/bench_features.py --init runs/pretrain --report grid7-last1,pixels        # + test top-1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import fastmae
from fastmae.commands.linprobe import (
    LinprobeConfig,
    head_accuracy,
    train_head_on_features,
)
from fastmae.config import FASHION_MNIST_DIR, DataConfig
from fastmae.data import build_loader
from fastmae.metrics.knn import knn_accuracy
from fastmae.models.heads import LinearHead
from fastmae.models.vit import encoder_tokens
from fastmae.train.device import autocast, resolve_precision
from fastmae.weights.read import read_weights


@torch.no_grad()
def block_tokens(model, loader, blocks: int, precision: str, grids: tuple[int, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One pass over a split: for each of the last `blocks` blocks the mean patch token after the final norm
    ('avg-b-i') and before it ('avg-b-i-raw'), plus the last block's normed cls token: {name: (N, D)}, labels."""
    model.eval()
    depth = len(model.blocks)
    first = depth - blocks
    out: dict[str, list[torch.Tensor]] = {}
    labels = []
    cpu = torch.device("cpu")
    for imgs, y in loader:
        with autocast(cpu, precision):
            raw = encoder_tokens(model, imgs, list(range(first, depth)), norm=False)  # each (B, 1+L, D)
            for i, t in zip(range(first, depth), raw):
                n = model.norm(t)
                if i == depth - 1 and grids:
                    h, w = model.patch_embed.grid_for(imgs.shape[-2], imgs.shape[-1])
                    m = n[:, 1:].float().transpose(1, 2).reshape(t.shape[0], -1, h, w)  # (B, D, h, w)
                    for g in grids:  # (B, D * g * g): a g x g grid of region means, keeping coarse layout
                        out.setdefault(f"grid{g}-last1", []).append(F.adaptive_avg_pool2d(m, g).flatten(1))
                out.setdefault(f"avg-b{i - depth}", []).append(n[:, 1:].mean(1).float())
                out.setdefault(f"avg-b{i - depth}-raw", []).append(t[:, 1:].float().mean(1))
            out.setdefault("cls-b-1", []).append(n[:, 0].float())
            out.setdefault("pixels", []).append(imgs.flatten(1).float())  # the reference: normalised raw pixels
        labels.append(y)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


def choices(feats: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """Named feature choices: the last block's mean or cls token, and averages of the last k blocks' means."""
    named = {"pixels": feats["pixels"], "cls-last1": feats["cls-b-1"], **{k: v for k, v in feats.items() if k.startswith("grid")}}
    for k in range(1, blocks + 1):
        for raw in ("", "-raw"):
            named[f"avg-last{k}{raw}"] = torch.stack([feats[f"avg-b{-i}{raw}"] for i in range(1, k + 1)]).mean(0)
    return named


def knn(mem: torch.Tensor, ymem: torch.Tensor, q: torch.Tensor, yq: torch.Tensor, centred: bool) -> float:
    """kNN top-1 (%) with the DINO/MAE monitor's k=20, T=0.07; centred subtracts the memory's mean first."""
    if centred:
        mu = mem.mean(0, keepdim=True)
        mem, q = mem - mu, q - mu
    return knn_accuracy(mem, ymem, q, yq, num_classes=10)["top1"]


def probe(tr: torch.Tensor, ytr: torch.Tensor, te: torch.Tensor, yte: torch.Tensor, seed: int = 0) -> float:
    """`fastmae linprobe`'s default head and schedule (BatchNorm + linear, LARS, cached features) -> top-1 (%)."""
    torch.manual_seed(seed)
    head = LinearHead(tr.shape[1], 10)
    train_head_on_features(head, tr, ytr, LinprobeConfig().optim, world_size=1, seed=seed)
    return head_accuracy(head, te, yte)["top1"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="a pretraining run folder or checkpoint")
    p.add_argument("--data", default=FASHION_MNIST_DIR)
    p.add_argument("--blocks", type=int, default=4, help="consider the last N blocks")
    p.add_argument("--holdout", type=int, default=10000, help="training images held out for selection")
    p.add_argument("--grids", default="", help="also g x g grids of region means of the last block, e.g. 2,3")
    p.add_argument("--probe", type=int, default=0, help="also linear-probe the best N kNN choices (and avg-last1)")
    p.add_argument("--report", default="", help="comma-separated choices to score on the test split")
    p.add_argument("--random", action="store_true", help="score a randomly initialised encoder of the run's shape")
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    precision = resolve_precision(args.precision, torch.device("cpu")).name
    model = fastmae.load(args.init)
    if args.random:  # the control: the same architecture and data normalisation, freshly initialised
        torch.manual_seed(0)
        fresh = type(model)(**read_weights(args.init).model_kwargs).eval()
        fresh.data_mean, fresh.data_std = model.data_mean, model.data_std
        model = fresh
    data = DataConfig(path=args.data, mean=tuple(model.data_mean), std=tuple(model.data_std))
    size = tuple(model.patch_embed.img_size)
    grids = tuple(int(g) for g in args.grids.split(",") if g)
    splits = {}
    for split in ("train", "eval"):
        loader = build_loader(data, split, size, 500, train=False)
        loader.set_epoch(0)
        splits[split] = block_tokens(model, loader, args.blocks, precision, grids)
    (tr, ytr), (te, yte) = splits["train"], splits["eval"]
    n = len(ytr) - args.holdout
    named_tr, named_te = choices(tr, args.blocks), choices(te, args.blocks)
    rows: dict[str, dict[str, float]] = {}
    for name, f in named_tr.items():
        for centred in (False, True):
            rows[name + ("+c" if centred else "")] = {"knn": knn(f[:n], ytr[:n], f[n:], ytr[n:], centred)}
    ranked = sorted(rows, key=lambda r: -rows[r]["knn"])
    to_probe = {r.removesuffix("+c") for r in ranked[: args.probe]}
    if args.probe:  # the reference and every grid choice are always probed
        to_probe |= {"avg-last1", "pixels"} | {name for name in named_tr if name.startswith("grid")}
    for name in sorted(to_probe):  # the probe's BatchNorm centres anyway: one probe per feature
        f = named_tr[name]
        rows.setdefault(name, {})["probe"] = probe(f[:n], ytr[:n], f[n:], ytr[n:])
    print(f"# {args.init}{' (random init, seed 0)' if args.random else ''}: top-1 on the held-out last {args.holdout} training images ({precision}; kNN k=20, "
          f"T=0.07; probe = fastmae linprobe defaults); {time.perf_counter() - t0:.0f} s")
    print("| features | kNN | linear probe |\n| --- | ---: | ---: |")
    for name in ranked:
        pr = rows.get(name.removesuffix("+c"), {}).get("probe")
        print(f"| {name} | {rows[name]['knn']:.2f} | {'' if pr is None or name.endswith('+c') else f'{pr:.2f}'} |")
    result = {"init": args.init, "random": args.random, "precision": precision, "holdout": rows}
    for name in filter(None, args.report.split(",")):
        base, centred = name.removesuffix("+c"), name.endswith("+c")
        test = {"knn": knn(named_tr[base], ytr, named_te[base], yte, centred)}
        if not centred:
            test["probe"] = probe(named_tr[base], ytr, named_te[base], yte)
        result.setdefault("test", {})[name] = test
        print(f"# test (10,000 images; all 60,000 training images as memory / probe data): {name} "
              + ", ".join(f"{k} {v:.2f}" for k, v in test.items()))
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
