"""Which encoder features are best for kNN on Fashion-MNIST? Chosen on a held-out slice of train, never on test.

For a pretrained run folder, the kNN top-1 (k=20, T=0.07, cosine) of several feature choices: the mean of the
patch tokens or the cls token of one block or the average of the last k blocks, each block's tokens after the
final norm (as timm's forward_intermediates) or before it. Selection split: the last --holdout training images
are queries against the first 60,000 - holdout; the test split is scored only for the choice passed with
--report (so the reported number was not tuned on it).

    python benchmarks/bench_features.py --init runs/pretrain                      # selection table
    python benchmarks/bench_features.py --init runs/pretrain --report avg-last3   # + test top-1 of one choice
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

import fastmae
from fastmae.config import FASHION_MNIST_DIR, DataConfig
from fastmae.data import build_loader
from fastmae.knn import knn_accuracy


@torch.no_grad()
def block_features(model, loader, blocks: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mean-pooled patch tokens of each of the last `blocks` blocks, after the final norm and before it, plus the
    last block's cls token: {name: (N, D)}, labels (N,)."""
    model.eval()
    depth = len(model.blocks)
    idx = list(range(depth - blocks, depth))
    out: dict[str, list[torch.Tensor]] = {}
    labels = []
    for imgs, y in loader:
        for norm in (True, False):
            for i, m in zip(idx, model.forward_intermediates(imgs, idx, norm=norm)):  # each (B, D, h, w)
                out.setdefault(f"avg-b{i - depth}{'' if norm else '-raw'}", []).append(m.mean(dim=(2, 3)))
        out.setdefault("cls-b-1", []).append(fastmae.encode(model, imgs, "token"))  # (B, D)
        labels.append(y)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


def choices(feats: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """Named feature choices: the last block's mean or cls token, and averages of the last k blocks' means."""
    named = {"avg-last1": feats["avg-b-1"], "avg-last1-raw": feats["avg-b-1-raw"], "cls-last1": feats["cls-b-1"]}
    for k in range(2, blocks + 1):
        named[f"avg-last{k}"] = torch.stack([feats[f"avg-b{-i}"] for i in range(1, k + 1)]).mean(0)
        named[f"avg-last{k}-raw"] = torch.stack([feats[f"avg-b{-i}-raw"] for i in range(1, k + 1)]).mean(0)
    return named


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="a pretraining run folder or checkpoint")
    p.add_argument("--data", default=FASHION_MNIST_DIR)
    p.add_argument("--blocks", type=int, default=4, help="consider the last N blocks")
    p.add_argument("--holdout", type=int, default=10000, help="training images held out for selection")
    p.add_argument("--report", default="", help="also score this choice on the test split")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model = fastmae.load(args.init)
    data = DataConfig(path=args.data, mean=tuple(model.data_mean), std=tuple(model.data_std))
    size = tuple(model.patch_embed.img_size)
    splits = {}
    for split in ("train", "eval"):
        loader = build_loader(data, split, size, 500, train=False)
        loader.set_epoch(0)
        splits[split] = block_features(model, loader, args.blocks)
    (tr, ytr), (te, yte) = splits["train"], splits["eval"]
    n = len(ytr) - args.holdout
    named_tr, named_te = choices(tr, args.blocks), choices(te, args.blocks)
    rows = {}
    for name, f in named_tr.items():
        rows[name] = knn_accuracy(f[:n], ytr[:n], f[n:], ytr[n:], num_classes=10)["top1"]
    print(f"# {args.init}: kNN top-1 on the held-out last {args.holdout} training images (k=20, T=0.07)")
    for name, acc in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {acc:.2f} |")
    result = {"init": args.init, "holdout": rows, "seconds": time.perf_counter() - t0}
    if args.report:
        acc = knn_accuracy(named_tr[args.report], ytr, named_te[args.report], yte, num_classes=10)["top1"]
        result["test"] = {args.report: acc}
        print(f"# test (10,000 images, all 60,000 as the kNN memory): {args.report} {acc:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
