"""The training and evaluation loops: one epoch of a Task (AMP, accumulation, DDP, non-finite checks), evaluation,
feature extraction.

Shapes: B batch, C channels, H, W image, D feature width, K classes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..metrics.classification import topk_correct
from .device import autocast
from .dist import DistInfo, all_gather_cat, all_reduce_mean, any_rank
from .log import progress
from .optim import set_lr
from .runtime import Progress, Runtime


def to_device(targets: Any, device: torch.device) -> Any:
    """Every tensor in a tree of dicts, lists and tuples moved to `device` (non-blocking); the structure is kept, so a
    loader may yield labels, label maps or per-image dicts of boxes and heatmaps alike."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device, non_blocking=True)
    if isinstance(targets, Mapping):
        return {k: to_device(v, device) for k, v in targets.items()}
    if isinstance(targets, (list, tuple)):
        return type(targets)(to_device(v, device) for v in targets)
    return targets


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; raised before anything is checkpointed."""


@dataclass
class Task:
    """What a command trains, for `trainer.fit`: the model and its optimizer, the loss, the lr of every step."""

    model: nn.Module  # the raw module: checkpoints store its state; fit wraps it (torch.compile, DDP) to train
    optimizer: torch.optim.Optimizer
    # (model, images, targets) -> a scalar, or a dict of named terms ('loss_*', a DenseHead's) summed to train
    loss: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor | dict[str, torch.Tensor]]
    lr: Callable[[float], float]  # lr at a global step (optim.Schedule)
    meta: dict  # checkpoint metadata: what to build to load the weights (trainer.model_meta)
    accum_iter: int = 1  # batches per optimizer step
    clip_grad: float = 0.0  # gradient-norm clip (0 = off)
    on_epoch_end: Callable[..., dict] | None = None  # (epoch, model, progress) -> extra log entries
    shardable: bool = False  # the command runs the model on every rank wherever it does (--run.parallel fsdp works)


@dataclass
class EpochResult:
    loss: float  # mean loss over the epoch's batches so far, including a resumed part (averaged over ranks)
    steps: int  # batches processed by this call
    loss_sum: float  # this rank's float32 running sum of batch losses over the epoch so far (for a mid-epoch save)
    loss_count: int  # batches in loss_sum
    images: int  # images processed on all ranks
    seconds: float
    stopped: bool  # a stop signal ended the epoch early
    terms: dict[str, float] = None  # a dict loss's terms: means over the batches this call ran (averaged over ranks)


def total_loss(out: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the scalar to train, its named terms): a dict loss is summed; a scalar has no terms."""
    if isinstance(out, Mapping):
        return sum(out.values()), dict(out)
    return out, {}


def deliver_on(batches, device: torch.device) -> None:
    """A Loader delivers its batches on `device` (file workers' uint8 pixels are normalised there); other
    iterables of batches are left as they are."""
    if hasattr(batches, "set_device"):
        batches.set_device(device)


def train_one_epoch(task: Task, model: nn.Module, loader, rt: Runtime, prog: Progress,
                    scaler: torch.amp.GradScaler | None, stop: Callable[[], bool], epochs: int) -> EpochResult:
    """Train `model` (task.model, maybe wrapped) over the rest of epoch prog.epoch, from batch prog.batch.

    Global step = epoch x batches per epoch + batch. The optimizer steps every task.accum_iter batches with
    task.lr(step), groups counted from the epoch's first batch (a resumed epoch keeps them); gradients of the
    micro-batches in between are not all-reduced (no_sync). A stop inside a group takes effect after its update
    (at most accum_iter - 1 more batches): a save there would lose the group's gradients. Every `check`
    steps (1 on a CPU, 20 on a GPU, where reading the loss back syncs) the loss is checked (a non-finite one
    raises NonFiniteLossError naming the step), logged, and the stop decision taken: in a DDP job agreed by
    all ranks (any rank's signal stops all after the same batch, so they enter the same collectives).
    prog.loss_sum / loss_count continue the running loss of an epoch resumed mid-way.
    """
    steps_per_epoch = len(loader)
    deliver_on(loader, rt.device)
    first_step, num_batches = prog.epoch * steps_per_epoch + prog.batch, steps_per_epoch - prog.batch
    device, dist = rt.device, rt.dist
    check = 1 if device.type == "cpu" else 20
    log_every = max(1, steps_per_epoch // 20)  # TensorBoard points per epoch
    show = rt.run.progress and dist.is_main
    loader.set_epoch(prog.epoch, start_batch=prog.batch)
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.full((), prog.loss_sum, dtype=torch.float32, device=device)
    term_sums: dict[str, torch.Tensor] = {}  # name -> this call's float32 sum of the term
    steps = images = 0
    stopped = stopping = False  # stopping: a stop was asked for; it ends the epoch after the next update
    bar = progress(loader, total=num_batches, enabled=show, desc=f"epoch {prog.epoch + 1}/{epochs}")
    lr = task.lr(first_step)
    t_last, img_last = t0, 0
    for i, (imgs, targets) in enumerate(bar):
        step, b = first_step + i, prog.batch + i  # b: the batch's index in its epoch
        if b % task.accum_iter == 0:
            lr = task.lr(step)
            set_lr(task.optimizer, lr)
        imgs = imgs.to(device, non_blocking=True)  # (B, C, H, W)
        targets = to_device(targets, device)  # labels (B,), label maps (B, H, W), or a dict of tensors
        update = (b + 1) % task.accum_iter == 0 or i + 1 == num_batches
        no_sync = getattr(model, "no_sync", None)  # DDP: skip the all-reduce inside an accumulation group
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: the same, as a switch
            model.set_requires_gradient_sync(update)
        with no_sync() if (no_sync is not None and not update) else contextlib.nullcontext():
            with autocast(device, rt.precision):
                loss, terms = total_loss(task.loss(model, imgs, targets))
            scaled = loss / task.accum_iter
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if update:
            optimizer_step(task, model, scaler)
        loss_sum += loss.detach().float()
        for k, v in terms.items():
            term_sums[k] = term_sums.get(k, 0) + v.detach().float()
        steps += 1
        images += imgs.shape[0] * dist.world_size
        if steps % check == 0 or i + 1 == num_batches:
            value = loss.detach().float().item()
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"non-finite loss ({value}) at step {step}; nothing was checkpointed after it. Lower the learning "
                    f"rate (--optim.blr), enable gradient clipping (--optim.clip_grad 1.0) or train in fp32."
                )
            now = time.perf_counter()
            ips = (images - img_last) / max(now - t_last, 1e-9)
            t_last, img_last = now, images
            if show:
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
            if step % log_every == 0:
                rt.logger.scalars(step, {"loss": value, "lr": lr, "images_per_s": ips,
                                         **{k: float(v.detach()) for k, v in terms.items()}})
        if i + 1 >= num_batches:
            break
        if not stopping:
            if dist.distributed:  # the same answer on every rank
                stopping = steps % check == 0 and any_rank(stop(), dist, device)
            else:
                stopping = stop()
        if stopping and update:
            stopped = True
            break
    if show:
        bar.close()
    count = prog.loss_count + steps
    mean = all_reduce_mean(loss_sum / max(count, 1), dist).item()
    names = sorted(term_sums)  # every rank's head returns the same terms
    means = all_reduce_mean(torch.stack([term_sums[k] for k in names]) / max(steps, 1), dist).tolist() if names else []
    return EpochResult(loss=mean, steps=steps, loss_sum=loss_sum.item(), loss_count=count, images=images,
                       seconds=time.perf_counter() - t0, stopped=stopped, terms=dict(zip(names, means)))


def optimizer_step(task: Task, model: nn.Module, scaler: torch.amp.GradScaler | None) -> None:
    """Unscale (fp16), clip, step and zero the gradients."""
    if scaler is not None:
        scaler.unscale_(task.optimizer)
    if task.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip_grad)
    if scaler is not None:
        scaler.step(task.optimizer)
        scaler.update()
    else:
        task.optimizer.step()
    task.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str,
    dist: DistInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) of every batch, gathered from all ranks."""
    deliver_on(batches, device)
    feats, labels = [], []
    for imgs, y in batches:
        with autocast(device, precision):
            f = fn(imgs.to(device, non_blocking=True))  # (B, D)
        feats.append(f.float())
        labels.append(y.to(device))
    f, y = torch.cat(feats), torch.cat(labels)  # (N, D), (N,)
    return all_gather_cat(f, dist), all_gather_cat(y, dist)


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
    deliver_on(batches, device)
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
