"""`fastmae knn` and `fastmae linprobe`: judge a frozen encoder by its features, as in the paper.

Shapes: N samples, D feature width, K classes. Both build the encoder with its final `norm` kept and
pool features by --model.global_pool ('token': cls token; 'avg': mean of patch tokens), the same
features the pretraining kNN monitor uses.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import build_classifier, data_for, load_backbone, pooled_features
from .checkpoint import atomic_write_text, save_checkpoint
from .config import DataConfig, KnnConfig, LinprobeConfig, ViTModelConfig, validate
from .data import build_loader
from .dist import print0
from .engine import evaluate, extract_features
from .knn import knn_accuracy
from .optim import LARS, lr_at, scaled_lr, set_lr
from .trainer import Runtime, fit, model_meta, setup


def probe_encoder(init: str, model_cfg: ViTModelConfig, data_cfg: DataConfig, rt: Runtime, batch_size: int):
    """(frozen encoder, train loader without augmentation, eval loader, data config used) for probing."""
    bb = load_backbone(init, model_cfg)
    data_cfg = data_for(bb, data_cfg)
    img_size = tuple(model_cfg.img_size) if model_cfg.img_size[0] else tuple(bb.kwargs["img_size"])
    d = rt.dist
    loaders = [build_loader(data_cfg, split, img_size, batch_size, train=False, seed=rt.run.seed, rank=d.rank,
                            world_size=d.world_size, drop_last=False) for split in ("train", "eval")]
    enc_cfg = dataclasses.replace(model_cfg, global_pool="token", drop_path=0.0)  # keeps the encoder's norm
    encoder = build_classifier(bb, enc_cfg, num_classes=0, in_chans=loaders[0].channels).to(rt.device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, loaders[0], loaders[1], data_cfg


def features_of(encoder: nn.Module, loader, pool: str, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features and (N,) labels of a whole split (all ranks)."""
    loader.set_epoch(0)
    return extract_features(lambda x: pooled_features(encoder, x, pool), loader, rt.device, rt.precision, rt.dist)


def _write_result(out_dir: Path, name: str, result: dict) -> Path:
    path = out_dir / f"{name}.json"
    atomic_write_text(json.dumps(result, indent=2, sort_keys=True), path)
    return path


def run_knn(cfg: KnnConfig) -> dict:
    """Weighted kNN top-1/top-5 of the encoder's features; writes knn.json to the output folder."""
    validate(cfg)
    rt = setup(cfg.run, cfg)
    t0 = time.perf_counter()
    encoder, train, val, _ = probe_encoder(cfg.init, cfg.model, cfg.data, rt, cfg.batch_size)
    if train.num_classes == 0:
        raise ValueError("kNN needs labels: use a labelled source (fashion-mnist, folder, or a list with labels)")
    pool = cfg.model.global_pool
    tr, va = features_of(encoder, train, pool, rt), features_of(encoder, val, pool, rt)
    result = knn_accuracy(*tr, *va, num_classes=train.num_classes, k=cfg.k, temperature=cfg.temperature)
    result.update(init=cfg.init, pool=pool, k=cfg.k, temperature=cfg.temperature, train=len(tr[1]), eval=len(va[1]),
                  seconds=time.perf_counter() - t0)
    if rt.dist.is_main:
        path = _write_result(rt.out_dir, "knn", result)
        print0(rt.dist, f"kNN (k={cfg.k}, T={cfg.temperature}, {pool} features of {cfg.init}): top-1 "
                        f"{result['knn_top1']:.2f}%  top-5 {result['knn_top5']:.2f}%  ({path})")
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
            feats = pooled_features(self.encoder, imgs, self.pool)
        return self.head(feats.float())


def _probe_lr(cfg: LinprobeConfig, world: int) -> float:
    return scaled_lr(cfg.optim.blr, cfg.optim.batch_size * cfg.optim.accum_iter * world, cfg.optim.lr)


def train_head_on_features(
    head: LinearHead, feats: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
    warmup_epochs: float, min_lr: float, weight_decay: float, seed: int,
) -> list[float]:
    """LARS on cached features (N, D) with the warmup+cosine schedule; returns the per-epoch mean loss."""
    opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = feats.shape[0]
    steps = max(n // batch_size, 1)
    total, warmup = epochs * steps, int(round(warmup_epochs * steps))
    losses = []
    head.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]  # (b,)
            set_lr(opt, lr_at(epoch * steps + i, total, warmup, lr, min_lr))
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item()
        losses.append(tot / steps)
    return losses


@torch.no_grad()
def head_accuracy(head: LinearHead, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    head.eval()
    logits = head(feats)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    n = max(labels.numel(), 1)
    return {"top1": 100.0 * hit[:, 0].sum().item() / n, "top5": 100.0 * hit.any(1).sum().item() / n}


def run_linprobe(cfg: LinprobeConfig) -> dict:
    """Linear probe with LARS; cached features by default, the paper's augmented crops with --augment."""
    validate(cfg)
    rt = setup(cfg.run, cfg)
    t0 = time.perf_counter()
    encoder, train, val, data_cfg = probe_encoder(cfg.init, cfg.model, cfg.data, rt, cfg.optim.batch_size)
    if train.num_classes == 0:
        raise ValueError("a linear probe needs labels: use a labelled source (fashion-mnist, folder, list with labels)")
    pool, K = cfg.model.global_pool, train.num_classes
    head = LinearHead(encoder.embed_dim, K).to(rt.device)
    lr = _probe_lr(cfg, rt.dist.world_size)
    if not cfg.augment:
        tr, va = features_of(encoder, train, pool, rt), features_of(encoder, val, pool, rt)
        feat_s = time.perf_counter() - t0
        losses = train_head_on_features(head, *tr, epochs=cfg.optim.epochs, batch_size=cfg.optim.batch_size, lr=lr,
                                        warmup_epochs=cfg.optim.warmup_epochs, min_lr=cfg.optim.min_lr,
                                        weight_decay=cfg.optim.weight_decay, seed=cfg.run.seed)
        result = {**head_accuracy(head, *va), "train_loss": losses[-1], "feature_seconds": feat_s}
        if rt.dist.is_main:
            save_checkpoint(rt.out_dir, {"model": head.state_dict(), "epoch": cfg.optim.epochs, "batch": 0,
                                         "step": cfg.optim.epochs, "rng": {}},
                            {"kind": "linear_head", "dim": encoder.embed_dim, "num_classes": K, "pool": pool,
                             "init": cfg.init})
    else:
        train_aug = build_loader(data_cfg, "train", tuple(encoder.patch_embed.img_size), cfg.optim.batch_size,
                                 train=True, seed=cfg.run.seed, rank=rt.dist.rank, world_size=rt.dist.world_size)
        model = ProbeModel(encoder, head, pool).to(rt.device)
        opt = LARS(head.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
        steps = len(train_aug)
        total, warmup = cfg.optim.epochs * steps, int(round(cfg.optim.warmup_epochs * steps))
        fit(rt, model, opt, train_aug, epochs=cfg.optim.epochs,
            loss_fn=lambda m, x, y: F.cross_entropy(m(x), y),
            lr_fn=lambda s: lr_at(s, total, warmup, lr, cfg.optim.min_lr),
            meta=model_meta("linprobe", {"dim": encoder.embed_dim, "num_classes": K}, cfg))
        result = {k: v for k, v in evaluate(model, val, rt.device, rt.precision, rt.dist).items() if k != "loss"}
    result.update(init=cfg.init, pool=pool, epochs=cfg.optim.epochs, lr=lr, augment=cfg.augment,
                  seconds=time.perf_counter() - t0)
    if rt.dist.is_main:
        path = _write_result(rt.out_dir, "linprobe", result)
        print0(rt.dist, f"linear probe ({pool} features of {cfg.init}, {cfg.optim.epochs} epochs): top-1 "
                        f"{result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({path})")
    return result


__all__ = ["LinearHead", "run_knn", "run_linprobe"]
