"""`fastmae finetune`: end-to-end fine-tuning of the MAE encoder as a classifier (the paper's recipe).

Layer-wise lr decay, drop path, RandAugment + random erasing + mixup/cutmix with label smoothing
(soft-target cross entropy), warmup then cosine, top-1/top-5 on the evaluation split each epoch,
best and last checkpoints. Same data sources, output layout, resume and torchrun support as pretrain.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from ..config import (
    FRACTION,
    AugConfig,
    DataConfig,
    EncoderConfig,
    OptimConfig,
    Rule,
    RunConfig,
    finite,
    validate,
)
from ..data import build_loader, eval_split_name
from ..data.augment import FinetuneAugment, soft_target_cross_entropy
from ..figures.curves import FINETUNE_METRIC, epoch_entries, plot_learning_curve
from ..train.dist import print0
from ..train.engine import Task, evaluate
from ..train.optim import build_adamw, param_groups_lrd, schedule
from ..train.parallel import full_state_dict
from ..train.runtime import Progress, duration
from ..train.trainer import fit, model_meta, setup
from ..weights.backbone import build_classifier, data_for, encoder_init, encoder_kwargs
from ..weights.checkpoint import atomic_save, atomic_write_text

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae finetune --help`).

@dataclass(frozen=True)
class ViTModelConfig(EncoderConfig):
    """The classification ViT fine-tuning trains: the encoder, its pooling and stochastic depth."""

    RULES: ClassVar[dict[str, Rule]] = {"drop_path": FRACTION}

    global_pool: Literal["avg", "token"] = "avg"
    """avg: mean of patch tokens + fc_norm (the MAE fine-tuning default); token: cls token + norm."""
    drop_path: float = 0.1
    """Stochastic depth rate of the last block (linearly increasing from 0)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune a classification ViT from an MAE checkpoint (or from random init) and evaluate it each epoch."""

    RULES: ClassVar[dict[str, Rule]] = {"layer_decay": ((lambda v: finite(v) and 0 < v <= 1), "in (0, 1]")}

    recipe: Literal["", "fmnist-small", "paper"] = ""
    """A named recipe (fastmae/recipes.py) as the starting point; flags given with it override its values.
    fmnist-small: small images on a CPU (30 epochs, light augmentation); the defaults here are the paper's schedule at a small batch; paper: the paper's ImageNet values (pass --data.path)."""
    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder to start from, or 'random' for training from scratch."""
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=(0.08, 1.0)))
    model: ViTModelConfig = field(default_factory=ViTModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=100, warmup_epochs=5.0, batch_size=64, blr=5e-4, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999)))
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i gets lr x layer_decay^(depth + 1 - i)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune"))


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune from cfg.init ('random' = from scratch); returns the final and best evaluation metrics."""
    validate(cfg)
    rt = setup(cfg.run, cfg)
    d = rt.dist
    bb = encoder_init(cfg.init, cfg.model)
    data_cfg = data_for(bb, cfg.data)
    img_size = tuple(cfg.model.img_size) if cfg.model.img_size[0] else tuple(bb.model_kwargs["img_size"])
    train = build_loader(data_cfg, "train", img_size, cfg.optim.batch_size, train=True, seed=cfg.run.seed,
                         rank=d.rank, world_size=d.world_size)
    val = build_loader(data_cfg, "eval", img_size, cfg.optim.batch_size, train=False, seed=cfg.run.seed,
                       rank=d.rank, world_size=d.world_size, drop_last=False)
    train.require_classes("fine-tuning")
    K = train.num_classes
    model = build_classifier(bb, cfg.model, K, train.channels, global_pool=cfg.model.global_pool,
                             drop_path=cfg.model.drop_path).to(rt.device)
    lr = schedule(cfg.optim, len(train), d.world_size, train.num_samples)
    groups = param_groups_lrd(model, cfg.optim.weight_decay, cfg.layer_decay)
    optimizer = build_adamw(groups, lr.peak, cfg.optim.betas, rt.device)
    augment = FinetuneAugment(cfg.aug, K, train.mean, train.std)
    print0(d, f"fine-tune {bb.source} -> ViT {model.embed_dim}x{len(model.blocks)} ({model.global_pool} pool) on "
              f"{train.num_samples} images, {K} classes | effective batch {lr.effective_batch}, lr {lr.peak:.3g}, layer decay "
              f"{cfg.layer_decay} | {rt.precision_label} on {rt.device} x{d.world_size}")

    def loss_fn(m: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # augmentation randomness comes from the global RNG (saved in checkpoints) so resume is exact
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        with torch.autocast(rt.device.type, enabled=False):
            x, targets = augment(imgs, labels, g)
        return soft_target_cross_entropy(m(x), targets)

    best_path = rt.out_dir / "best.pt"
    history: list[dict] = []

    def on_epoch_end(epoch: int, m: nn.Module, prog: Progress) -> dict:
        metrics = evaluate(m, val, rt.device, rt.precision, d)
        out = {"top1": metrics["top1"], "top5": metrics["top5"], "eval_loss": metrics["loss"]}
        best = prog.extra.get("best_top1", -1.0)
        if metrics["top1"] > best:
            prog.extra.update(best_top1=metrics["top1"], best_epoch=epoch + 1)
            weights = full_state_dict(m)  # every rank takes part when FSDP shards the model
            if d.is_main:
                atomic_save(weights, best_path)
                atomic_write_text(json.dumps({**meta, "epoch": epoch + 1, **out}, indent=2), best_path.with_suffix(".json"))
        out["best_top1"] = prog.extra["best_top1"]
        history.append(out)
        m.train()
        return out

    meta = model_meta("vit", _vit_kwargs(model), cfg, mean=list(train.mean), std=list(train.std), init=cfg.init,
                      classes=list(train.classes))
    t0 = time.perf_counter()
    task = Task(model, optimizer, loss=loss_fn, lr=lr, meta=meta, accum_iter=cfg.optim.accum_iter,
                clip_grad=cfg.optim.clip_grad, on_epoch_end=on_epoch_end, shardable=True)
    prog, last = fit(rt, task, train, cfg.optim.epochs)
    result = {"init": cfg.init, "epochs_done": prog.epoch, "best_top1": prog.extra.get("best_top1"),
              "best_epoch": prog.extra.get("best_epoch"), "holdout": cfg.data.holdout, "seconds": time.perf_counter() - t0,
              "last_checkpoint": str(last) if last else None, "best_checkpoint": str(best_path)}
    last_epoch = history[-1] if history else _last_logged_epoch(rt.out_dir / "log.jsonl")  # none run here: finished
    if last_epoch:
        result.update(top1=last_epoch["top1"], top5=last_epoch["top5"])
    if d.is_main and prog.epoch >= cfg.optim.epochs:
        atomic_write_text(json.dumps(result, indent=2, sort_keys=True), rt.out_dir / "finetune.json")
        curve = plot_learning_curve(rt.out_dir / "log.jsonl", rt.out_dir / "learning_curve.png",
                                    f"fine-tuning from {cfg.init} on {cfg.data.source}",
                                    loss_label="training loss (soft-target cross entropy)", metric=FINETUNE_METRIC)
        print0(d, f"fine-tuned {prog.epoch} epochs in {duration(result['seconds'], prog)}, on the {eval_split_name(cfg.data)}: last top-1 "
                  f"{result.get('top1', float('nan')):.2f}%, best top-1 {result['best_top1']:.2f}% (epoch "
                  f"{result['best_epoch']}) | best {best_path}, last {last}, learning curve {curve}")
    return result


def _last_logged_epoch(log: Path) -> dict:
    """The log's last epoch entry with a top-1 ({} if none): the result of a finished run started again."""
    entries = [e for e in epoch_entries(log) if "top1" in e] if log.is_file() else []
    return entries[-1] if entries else {}


def _vit_kwargs(model) -> dict:
    """Constructor kwargs that rebuild this classifier (stored in checkpoint metadata)."""
    kw = encoder_kwargs(model)
    return {**kw, "img_size": list(kw["img_size"]), "num_classes": model.num_classes, "global_pool": model.global_pool}
