"""`fastmae linprobe`: a linear classifier on a frozen encoder's features (LARS, as in the paper).

Shapes: N samples, D feature width, K classes. The command builds the encoder with its final `norm` kept and takes
the features --model.global_pool names ('token': cls token; 'avg': mean of patch tokens; 'tokens': every patch
token, flattened; 'auto': tokens on small patch grids, else avg), as the pretraining kNN monitor does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..api import feature_pool
from ..config import DataConfig, OptimConfig, ProbeModelConfig, RunConfig, to_dict, validate
from ..data import build_loader
from ..metrics.classification import topk_correct
from ..models.dense import DenseModel
from ..models.heads import LinearHead
from ..train.engine import Task, evaluate
from ..train.optim import LARS, schedule, set_lr
from ..train.probe import features_of, probe_encoder
from ..train.results import refuse_replacing, report_result
from ..train.trainer import fit, model_meta, setup
from ..weights.checkpoint import save_checkpoint

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae linprobe --help`).

@dataclass(frozen=True)
class LinprobeConfig:
    """Linear probe: frozen encoder, BatchNorm without affine, then a linear head trained with LARS."""

    recipe: Literal["", "fmnist-small", "paper"] = ""
    """A named recipe (fastmae/recipes.py) as the starting point; flags given with it override its values.
    fmnist-small: small images on a CPU (the defaults here); paper: the paper's ImageNet values (pass --data.path)."""
    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, or 'random' for a randomly initialised encoder."""
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=(0.08, 1.0)))
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    augment: bool = False
    """True: the paper's RandomResizedCrop + flip every epoch (the encoder runs each epoch); False: features
    of the unaugmented images are extracted once and cached (much faster on a CPU)."""
    overwrite: bool = False
    """Replace the linprobe.json and head checkpoint of an earlier finished run in --run.output_dir (otherwise they
    stop the command before any work; an unfinished --augment run resumes as training commands do)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=90, warmup_epochs=10.0, batch_size=256, blr=16.0, weight_decay=0.0))
    """LARS lr = blr x batch / 256 (the paper's blr 0.1 is for batch 16384; BENCHMARKS.md has the small-batch
    search behind the default)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/linprobe"))


def train_head_on_features(
    head: LinearHead, feats: torch.Tensor, labels: torch.Tensor, optim: OptimConfig, world_size: int, seed: int,
) -> list[float]:
    """LARS on cached features (N, D) with the run's warmup+cosine schedule; returns the per-epoch mean loss."""
    n = feats.shape[0]
    steps = max(n // optim.batch_size, 1)
    lr = schedule(optim, steps, world_size, n * world_size)  # every rank trains on all n features
    opt = LARS(head.parameters(), lr=lr.peak, weight_decay=optim.weight_decay)
    g = torch.Generator().manual_seed(seed)
    losses = []
    head.train()
    for epoch in range(optim.epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(steps):
            idx = perm[i * optim.batch_size : (i + 1) * optim.batch_size]  # (b,)
            set_lr(opt, lr(epoch * steps + i))
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item()
        losses.append(tot / steps)
    return losses


@torch.no_grad()
def head_accuracy(head: LinearHead, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of the head on cached features."""
    head.eval()
    c1, c5 = topk_correct(head(feats), labels)
    n = max(labels.numel(), 1)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def run_linprobe(cfg: LinprobeConfig) -> dict:
    """Linear probe with LARS; cached features by default, the paper's augmented crops with --augment."""
    validate(cfg)
    if not cfg.overwrite:
        refuse_replacing([Path(cfg.run.output_dir) / "linprobe.json"], "--overwrite")
    rt = setup(cfg.run, cfg, write_config=cfg.augment)  # --augment resumes like training; cached: with the result
    t0 = time.perf_counter()
    encoder, train, val, data_cfg = probe_encoder(cfg.init, cfg.model, cfg.data, rt, cfg.optim.batch_size,
                                                  labels_for="a linear probe")
    pool, K = feature_pool(cfg.model.global_pool, encoder), train.num_classes
    dim = encoder.embed_dim * (encoder.patch_embed.num_patches if pool == "tokens" else 1)
    head = LinearHead(dim, K).to(rt.device)
    if not cfg.augment:
        tr, va = features_of(encoder, train, pool, rt), features_of(encoder, val, pool, rt)
        feat_s = time.perf_counter() - t0
        losses = train_head_on_features(head, *tr, cfg.optim, rt.dist.world_size, cfg.run.seed)
        lr = schedule(cfg.optim, max(len(tr[1]) // cfg.optim.batch_size, 1), rt.dist.world_size,
                      len(tr[1]) * rt.dist.world_size).peak
        result = {**head_accuracy(head, *va), "train_loss": losses[-1], "feature_seconds": feat_s}
        if rt.dist.is_main:
            save_checkpoint(rt.out_dir, {"model": head.state_dict(), "epoch": cfg.optim.epochs, "batch": 0,
                                         "step": cfg.optim.epochs, "rng": {}},
                            {"kind": "linear_head", "dim": dim, "num_classes": K, "pool": pool,
                             "init": cfg.init, "mean": list(train.mean), "std": list(train.std),
                             "classes": list(train.classes), "config": to_dict(cfg)})
    else:
        train_aug = build_loader(data_cfg, "train", tuple(encoder.patch_embed.img_size), cfg.optim.batch_size,
                                 train=True, seed=cfg.run.seed, rank=rt.dist.rank, world_size=rt.dist.world_size)
        model = DenseModel(encoder, head, finetune=False, pool=pool).to(rt.device)
        sched = schedule(cfg.optim, len(train_aug), rt.dist.world_size, train_aug.num_samples)
        lr = sched.peak
        opt = LARS(head.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
        task = Task(model, opt, loss=lambda m, x, y: head.loss(m(x), y), lr=sched,
                    meta=model_meta("linprobe", {"dim": dim, "num_classes": K}, cfg, pool=pool, init=cfg.init,
                                    mean=list(train.mean), std=list(train.std), classes=list(train.classes)))
        fit(rt, task, train_aug, cfg.optim.epochs)
        result = {k: v for k, v in evaluate(model, val, rt.device, rt.precision, rt.dist).items() if k != "loss"}
    result.update(init=cfg.init, pool=pool, epochs=cfg.optim.epochs, lr=lr, augment=cfg.augment,
                  holdout=cfg.data.holdout, seconds=time.perf_counter() - t0)
    report_result(rt, "linprobe", f"linear probe ({pool} features of {cfg.init}, {cfg.optim.epochs} epochs)", result,
            cfg.data)
    return result


__all__ = ["head_accuracy", "run_linprobe", "train_head_on_features"]
