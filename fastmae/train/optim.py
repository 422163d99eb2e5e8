"""Parameter groups, layer-wise lr decay, LARS, and the per-step lr schedule (pure).

Schedules are pure functions of the global step: linear warmup, then half-cycle cosine (or x0.1 steps at milestones).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn


def lr_at(step: float, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0,
          milestones: tuple[int, ...] = ()) -> float:
    """Learning rate at a (fractional) global step: linear warmup to peak, then half-cycle cosine to min_lr, or,
    with milestones (steps), peak x 0.1 per milestone passed."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if milestones:
        return peak_lr * 0.1 ** sum(step >= m for m in milestones)
    if total_steps <= warmup_steps:
        return peak_lr
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def scaled_lr(blr: float, effective_batch: int, lr: float = 0.0) -> float:
    """The paper's scaling rule: lr = blr x effective batch / 256, unless an absolute lr is given."""
    return lr if lr > 0 else blr * effective_batch / 256


@dataclass(frozen=True)
class Schedule:
    """The lr of every optimizer step of a run: the paper's scaling rule, warmup, then half-cycle cosine."""

    peak: float  # lr = blr x effective batch / 256, or --optim.lr
    total: int  # steps of the whole run
    warmup: int  # warmup steps
    min_lr: float
    effective_batch: int  # batch_size x accum_iter x world size
    milestones: tuple[int, ...] = ()  # steps where the lr drops x0.1 (a step schedule); () = cosine

    def __call__(self, step: float) -> float:
        return lr_at(step, self.total, self.warmup, self.peak, self.min_lr, self.milestones)


def schedule(optim, steps_per_epoch: int, world_size: int = 1, samples: int = 0) -> Schedule:
    """The Schedule of an OptimConfig for `steps_per_epoch` steps per epoch on `world_size` processes.

    samples: the training samples (all processes); a batch size larger than a process's share is refused, since
    the lr would be scaled for batches that are never drawn.
    """
    per_rank = -(-samples // world_size)
    if 0 < per_rank < optim.batch_size:
        each = " per process" if world_size > 1 else ""
        raise ValueError(f"--optim.batch_size {optim.batch_size} is more than the {per_rank} training samples{each}, "
                         f"so no batch of that size is drawn while the lr is scaled for it; pass --optim.batch_size "
                         f"{per_rank} or less, or more data")
    effective = optim.batch_size * optim.accum_iter * world_size
    return Schedule(peak=scaled_lr(optim.blr, effective, optim.lr), total=optim.epochs * steps_per_epoch,
                    warmup=int(round(optim.warmup_epochs * steps_per_epoch)), min_lr=optim.min_lr,
                    effective_batch=effective,
                    milestones=tuple(int(round(m * steps_per_epoch)) for m in getattr(optim, "milestones", ())))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, times its `lr_scale` (layer-wise decay) when it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _skip_decay(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    """No weight decay on biases, norms (1-D) and tokens/position embeddings."""
    return p.ndim <= 1 or name in skip or name.split(".")[-1] in skip


def _no_decay_names(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and undecayed biases/norms/tokens/pos embeds; frozen params left out."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _skip_decay(name, p, skip) else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def layer_id(name: str, num_layers: int) -> int:
    """BEiT-style depth of a ViT parameter: embeddings 0, block i -> i+1, everything after -> num_layers."""
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay groups: scale = layer_decay^(num_layers - layer_id); no decay on 1-D/tokens."""
    num_layers = len(model.blocks) + 1
    skip = _no_decay_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = _skip_decay(name, p, skip)
        lid = layer_id(name, num_layers)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - lid),
                "layer_id": lid,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in the MAE linear probe: SGD with momentum and a layer-wise trust ratio.

    For parameters with ndim > 1: g <- g + wd * w; g <- g * (eta * ||w|| / ||g||) (1 where a norm is 0).
    Biases and norms (ndim <= 1) are updated with plain momentum SGD.
    """

    def __init__(
        self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(w_norm)
                    q = torch.where(w_norm > 0, torch.where(g_norm > 0, g["trust_coefficient"] * w_norm / g_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the device supports it (CUDA and CPU), else foreach."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def param_groups_dense(model: nn.Module, weight_decay: float, finetune: bool, layer_decay: float) -> list[dict]:
    """A DenseModel's groups: the head at the full lr with weight decay on its weights; with `finetune`, the
    encoder's groups with layer-wise lr decay (frozen: none, its parameters take no gradient)."""
    groups = param_groups_weight_decay(model.head, weight_decay)
    if finetune:
        groups += param_groups_lrd(model.encoder, weight_decay, layer_decay)
    return [g for g in groups if g["params"]]
