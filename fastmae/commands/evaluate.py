"""`fastmae knn` and `fastmae linprobe`: judge a frozen encoder by its features, as in the paper.

Shapes: N samples, D feature width, K classes. Both build the encoder with its final `norm` kept and take
the features --model.global_pool names ('token': cls token; 'avg': mean of patch tokens; 'tokens': every patch
token, flattened; 'auto': tokens on small patch grids, else avg), as the pretraining kNN monitor does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import encode, feature_pool
from ..weights.backbone import build_classifier, data_for, encoder_init
from ..weights.checkpoint import atomic_write_text, save_checkpoint
from ..config import DataConfig, EncoderConfig, KnnConfig, LinprobeConfig, OptimConfig, validate
from ..data import build_loader, eval_split_name
from ..train.dist import print0
from ..train.engine import Task, evaluate, extract_features, topk_correct
from ..metrics.knn import knn_accuracy
from ..train.optim import LARS, schedule, set_lr
from ..train.results import refuse_replacing
from ..train.trainer import Runtime, fit, model_meta, setup, write_config


def probe_encoder(init: str, model_cfg: EncoderConfig, data_cfg: DataConfig, rt: Runtime, batch_size: int,
                  labels_for: str = ""):
    """(frozen encoder, train loader without augmentation, eval loader, data config used) for probing; with
    `labels_for` (the method's name) data without two or more classes is refused before any feature is computed."""
    bb = encoder_init(init, model_cfg)
    data_cfg = data_for(bb, data_cfg)
    img_size = tuple(model_cfg.img_size) if model_cfg.img_size[0] else tuple(bb.model_kwargs["img_size"])
    d = rt.dist
    loaders = [build_loader(data_cfg, split, img_size, batch_size, train=False, seed=rt.run.seed, rank=d.rank,
                            world_size=d.world_size, drop_last=False) for split in ("train", "eval")]
    if labels_for:
        loaders[0].require_classes(labels_for)
    encoder = build_classifier(bb, model_cfg, num_classes=0, in_chans=loaders[0].channels, global_pool="token")
    encoder = encoder.to(rt.device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, loaders[0], loaders[1], data_cfg


def features_of(encoder: nn.Module, loader, pool: str, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features and (N,) labels of a whole split (all ranks)."""
    loader.set_epoch(0)
    return extract_features(lambda x: encode(encoder, x, pool), loader, rt.device, rt.precision, rt.dist)


def _report(rt: Runtime, name: str, what: str, result: dict, data_cfg: DataConfig) -> None:
    """Rank 0 writes `<name>.json` and the config.json of the run that produced it (atomically) and prints
    `<what>: top-1 a%  top-5 b% on the <split> (<file>)`."""
    if not rt.dist.is_main:
        return
    path = rt.out_dir / f"{name}.json"
    write_config(rt)
    atomic_write_text(json.dumps(result, indent=2, sort_keys=True), path)
    print0(rt.dist, f"{what}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}% on the "
                    f"{eval_split_name(data_cfg)} ({path})")


def run_knn(cfg: KnnConfig) -> dict:
    """Weighted kNN top-1/top-5 of the encoder's features; writes knn.json to the output folder."""
    validate(cfg)
    if not cfg.knn.overwrite:
        refuse_replacing([Path(cfg.run.output_dir) / "knn.json"], "--knn.overwrite")
    rt = setup(cfg.run, cfg, write_config=False)  # written with knn.json: a failed run leaves the old pair
    t0 = time.perf_counter()
    encoder, train, val, _ = probe_encoder(cfg.init, cfg.model, cfg.data, rt, cfg.knn.batch_size, labels_for="kNN")
    pool = feature_pool(cfg.model.global_pool, encoder)
    tr, va = features_of(encoder, train, pool, rt), features_of(encoder, val, pool, rt)
    result = knn_accuracy(*tr, *va, num_classes=train.num_classes, k=cfg.knn.k, temperature=cfg.knn.temperature)
    result.update(init=cfg.init, pool=pool, k=cfg.knn.k, temperature=cfg.knn.temperature, train=len(tr[1]), eval=len(va[1]),
                  holdout=cfg.data.holdout, seconds=time.perf_counter() - t0)
    _report(rt, "knn", f"kNN (k={cfg.knn.k}, T={cfg.knn.temperature}, {pool} features of {cfg.init})", result, cfg.data)
    return result


class LinearHead(nn.Module):
    """BatchNorm without affine (a parameter-free whitening of features) then a linear layer (std 0.01)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(feats))


class ProbeModel(nn.Module):
    """Frozen encoder + trainable LinearHead; only the head is saved/optimised."""

    def __init__(self, encoder: nn.Module, head: LinearHead, pool: str):
        super().__init__()
        self.encoder, self.head, self.pool = encoder, head, pool

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.encoder.eval()
            feats = encode(self.encoder, imgs, self.pool)
        return self.head(feats.float())


def train_head_on_features(
    head: LinearHead, feats: torch.Tensor, labels: torch.Tensor, optim: OptimConfig, world_size: int, seed: int,
) -> list[float]:
    """LARS on cached features (N, D) with the run's warmup+cosine schedule; returns the per-epoch mean loss."""
    n = feats.shape[0]
    steps = max(n // optim.batch_size, 1)
    lr = schedule(optim, steps, world_size)
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
        lr = schedule(cfg.optim, max(len(tr[1]) // cfg.optim.batch_size, 1), rt.dist.world_size).peak
        result = {**head_accuracy(head, *va), "train_loss": losses[-1], "feature_seconds": feat_s}
        if rt.dist.is_main:
            save_checkpoint(rt.out_dir, {"model": head.state_dict(), "epoch": cfg.optim.epochs, "batch": 0,
                                         "step": cfg.optim.epochs, "rng": {}},
                            {"kind": "linear_head", "dim": dim, "num_classes": K, "pool": pool,
                             "init": cfg.init})
    else:
        train_aug = build_loader(data_cfg, "train", tuple(encoder.patch_embed.img_size), cfg.optim.batch_size,
                                 train=True, seed=cfg.run.seed, rank=rt.dist.rank, world_size=rt.dist.world_size)
        model = ProbeModel(encoder, head, pool).to(rt.device)
        sched = schedule(cfg.optim, len(train_aug), rt.dist.world_size)
        lr = sched.peak
        opt = LARS(head.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
        task = Task(model, opt, loss=lambda m, x, y: F.cross_entropy(m(x), y), lr=sched,
                    meta=model_meta("linprobe", {"dim": dim, "num_classes": K}, cfg))
        fit(rt, task, train_aug, cfg.optim.epochs)
        result = {k: v for k, v in evaluate(model, val, rt.device, rt.precision, rt.dist).items() if k != "loss"}
    result.update(init=cfg.init, pool=pool, epochs=cfg.optim.epochs, lr=lr, augment=cfg.augment,
                  holdout=cfg.data.holdout, seconds=time.perf_counter() - t0)
    _report(rt, "linprobe", f"linear probe ({pool} features of {cfg.init}, {cfg.optim.epochs} epochs)", result,
            cfg.data)
    return result


__all__ = ["LinearHead", "run_knn", "run_linprobe"]
