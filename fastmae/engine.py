"""The training and evaluation loops, with explicit arguments: AMP, accumulation, DDP, non-finite checks.

Shapes: B batch, C channels, H, W image, D feature width, K classes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .device import autocast
from .dist import DistInfo, all_gather_cat, all_reduce_mean, any_rank
from .log import progress
from .optim import set_lr


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; raised before anything is checkpointed."""


@dataclass
class EpochResult:
    loss: float  # mean loss over the epoch's batches so far, including a resumed part (averaged over ranks)
    steps: int  # batches processed by this call
    loss_sum: float  # this rank's float32 running sum of batch losses over the epoch so far (for a mid-epoch save)
    loss_count: int  # batches in loss_sum
    images: int  # images processed on all ranks
    seconds: float
    stopped: bool  # stop_requested() fired before the epoch ended


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    lr_fn: Callable[[int], float],
    first_step: int,
    num_batches: int,
    device: torch.device,
    precision: str,
    dist: DistInfo,
    accum_iter: int = 1,
    clip_grad: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    on_step: Callable[[int, float, float, float], None] | None = None,
    show_progress: bool = False,
    desc: str = "",
    check_every: int = 1,
    loss_sum0: float = 0.0,
    loss_count0: int = 0,
) -> EpochResult:
    """Run up to `num_batches` batches; global step = first_step + batch index.

    loss_fn(model, images, labels) returns the scalar loss. The optimizer steps every `accum_iter`
    batches with lr_fn(step); gradients of the micro-batches in between are not all-reduced (no_sync).
    A non-finite loss raises NonFiniteLossError naming the step. on_step(step, loss, lr, img/s) is
    called every `check_every` steps (that is also when the loss is read back from the device).
    loss_sum0 / loss_count0 continue the running loss of an epoch resumed mid-way, so its mean is the full epoch's.
    In a DDP job the stop decision is agreed (any rank's flag stops all) every `check_every` steps, so every rank
    leaves after the same batch and enters the same collectives (a signal reaching one rank first would otherwise
    send it into the checkpoint barrier while the others all-reduce gradients).
    """
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.full((), loss_sum0, dtype=torch.float32, device=device)
    steps = images = 0
    stopped = False
    bar = progress(batches, total=num_batches, enabled=show_progress, desc=desc)
    lr = lr_fn(first_step)
    t_last, img_last = t0, 0
    for i, (imgs, labels) in enumerate(bar):
        step = first_step + i
        if i % accum_iter == 0:
            lr = lr_fn(step)
            set_lr(optimizer, lr)
        imgs = imgs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        update = (i + 1) % accum_iter == 0 or i + 1 == num_batches
        sync = getattr(model, "no_sync", None)
        ctx = sync() if (sync is not None and not update) else contextlib.nullcontext()
        with ctx:
            with autocast(device, precision):
                loss = loss_fn(model, imgs, labels)
            scaled = loss / accum_iter
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if update:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
        steps += 1
        images += imgs.shape[0] * dist.world_size
        if steps % check_every == 0 or i + 1 == num_batches:
            value = loss.detach().float().item()
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"non-finite loss ({value}) at step {step}; nothing was checkpointed after it. Lower the learning "
                    f"rate (--optim.blr), enable gradient clipping (--optim.clip_grad 1.0) or train in fp32."
                )
            now = time.perf_counter()
            ips = (images - img_last) / max(now - t_last, 1e-9)
            t_last, img_last = now, images
            if show_progress:
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
            if on_step is not None:
                on_step(step, value, lr, ips)
        if i + 1 >= num_batches:
            break
        if dist.distributed:
            if steps % check_every == 0 and any_rank(stop_requested(), dist, device):
                stopped = True
                break
        elif stop_requested():
            stopped = True
            break
    if show_progress:
        bar.close()
    count = loss_count0 + steps
    mean = all_reduce_mean(loss_sum / max(count, 1), dist).item()
    return EpochResult(loss=mean, steps=steps, loss_sum=loss_sum.item(), loss_count=count, images=images,
                       seconds=time.perf_counter() - t0, stopped=stopped)


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str,
    dist: DistInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) of every batch, gathered from all ranks."""
    feats, labels = [], []
    for imgs, y in batches:
        with autocast(device, precision):
            f = fn(imgs.to(device, non_blocking=True))  # (B, D)
        feats.append(f.float())
        labels.append(y.to(device))
    f, y = torch.cat(feats), torch.cat(labels)  # (N, D), (N,)
    return all_gather_cat(f, dist), all_gather_cat(y, dist)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at K)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = top == labels[:, None]  # (B, maxk)
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str,
    dist: DistInfo,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy of a classifier over an evaluation loader."""
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1, top5, count
    for imgs, y in batches:
        imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(imgs)
        logits = logits.float()
        c1, c5 = topk_correct(logits, y)
        stats += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), c1, c5, y.numel()],
                              device=device, dtype=torch.float64)
    stats = all_reduce_mean(stats, dist) * dist.world_size
    n = max(stats[3].item(), 1)
    return {"loss": stats[0].item() / n, "top1": 100 * stats[1].item() / n, "top5": 100 * stats[2].item() / n}
