"""The dense-task contract: what `fastmae segment`, `detect` and `pose` share, written once.

A `DenseTask` says what is particular to a task (its splits and loaders, head and model, evaluator, output files,
figure and summary line); `run_dense(cfg, task)` does the rest: setup, the encoder from --init, the optimizer and
schedule, training through `trainer.fit` (resume, checkpoints, preemption, DDP), scoring every --*.eval_every epochs
and at the end, the result JSON and the learning curve. Evaluation is detectron2's: a `DatasetEvaluator` is reset,
`process`es each batch's targets and model outputs, and `evaluate`s once, gathering every rank's share.

Shapes: B batch, C channels, H, W the model's input size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import validate
from ..data.build import source_norm_stats
from ..figures.curves import plot_learning_curve
from ..tasks import DenseTaskRow
from ..weights.backbone import data_for, encoder_init
from ..weights.read import Weights
from ..weights.checkpoint import atomic_write_text
from .device import autocast
from .dist import print0
from .engine import Task, deliver_on
from .optim import build_adamw, param_groups_dense, schedule
from .runtime import Runtime
from .trainer import fit, model_meta, setup


class DatasetEvaluator:
    """detectron2's evaluator: `reset()` before a pass, `process(targets, outputs)` per batch (targets as the loader
    gave them, outputs as the model's forward gave them), `evaluate()` -> (predictions, metrics) once, gathered
    from every rank (each rank must call it)."""

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, targets: Any, outputs: Any) -> None:
        raise NotImplementedError

    def evaluate(self) -> tuple[Any, dict]:
        raise NotImplementedError


@torch.no_grad()
def inference(forward: Callable[[torch.Tensor], Any], model: nn.Module, loader, evaluator: DatasetEvaluator,
              device: torch.device, precision: str) -> tuple[Any, dict]:
    """Run `forward` (the model's, or a flip test) over every batch of an evaluation loader in eval mode on `device`
    at `precision`, feeding the evaluator; its (predictions, metrics). Batches stream: nothing of the split is held
    but the evaluator's per-image results. Training's evaluation and `fastmae predict` both run through here."""
    model.eval()
    deliver_on(loader, device)
    loader.set_epoch(0)
    evaluator.reset()
    for imgs, targets in loader:
        with autocast(device, precision):
            out = forward(imgs.to(device, non_blocking=True))
        evaluator.process(targets, out)
    return evaluator.evaluate()


@dataclass
class DenseParts:
    """What a task builds for one run: loaders, the model (encoder + head), what its checkpoint records, and the
    counts and descriptions the summary lines and the result JSON show."""

    train_loader: Any
    val_loader: Any
    model: nn.Module  # a DenseModel (or PoseModel): .head is the task's DenseHead
    model_kwargs: dict  # checkpoint metadata: what to build to load the weights
    size: tuple[int, int]  # the model's input (H, W)
    counts: tuple[int, int]  # training and evaluation samples (images or instances)
    describe: str  # the start line's middle: head, encoder, data
    meta: dict = field(default_factory=dict)  # further checkpoint metadata (classes, category ids)
    result: dict = field(default_factory=dict)  # further result-JSON entries
    state: dict = field(default_factory=dict)  # what the task's outputs need (splits, class names, ...)


class DenseTask:
    """One dense task. Class attributes name it; methods build its parts and write its outputs.

    row: its registry row (fastmae/tasks.py: subcommand, checkpoint kind, result file); section: its flag section
    (cfg.<section>.eval_every); metric: (log.jsonl key, axis label) of the score plotted on the learning curve;
    loss_label: the learning curve's loss axis.
    """

    row: DenseTaskRow
    section: str
    metric: tuple[str, str]
    loss_label: str

    @property
    def command(self) -> str:
        return self.row.command

    @property
    def kind(self) -> str:
        return self.row.kind

    @property
    def result(self) -> str:
        return self.row.result

    def channels(self, data_cfg) -> int:
        """The model's input channels: --data.channels, else the source's own (1 for Fashion-MNIST, else 3)."""
        return data_cfg.channels or (1 if data_cfg.source == "fashion-mnist" else 3)

    def build(self, cfg, rt: Runtime, bb: Weights, data_cfg, channels: int, mean: tuple, std: tuple) -> DenseParts:
        raise NotImplementedError

    def evaluator(self, cfg, parts: DenseParts, rt: Runtime) -> DatasetEvaluator:
        raise NotImplementedError

    def forward(self, cfg, model: nn.Module) -> Callable[[torch.Tensor], Any]:
        """What evaluation runs on a batch (default: the model's forward)."""
        return model

    def epoch_metrics(self, metrics: dict) -> dict:
        """The scores logged at an --*.eval_every epoch (default: the plotted metric)."""
        return {self.metric[0]: metrics[self.metric[0]]}

    def write(self, cfg, parts: DenseParts, predictions: Any, out_dir: Path) -> list[Path]:
        """The task's own output files (predictions, figure) on rank 0; the paths written that the summary names."""
        return []

    def summary(self, cfg, result: dict) -> str:
        raise NotImplementedError


def encoder_mode(cfg) -> str:
    """How the run trains its encoder, for the start and summary lines: 'fine-tuned' or 'frozen'."""
    return "fine-tuned" if cfg.finetune else "frozen"


def percent(value: float | None) -> str:
    """A score for a summary line: '12.34%', or 'n/a' where the metric is undefined (null in the result JSON)."""
    return "n/a" if value is None else f"{value:.2f}%"


def check_multiple(size: tuple[int, int], patch: int, what: str) -> None:
    """ValueError unless the model's input (H, W) is a multiple of the patch size, naming the flag."""
    if size[0] % patch or size[1] % patch:
        raise ValueError(f"the {what} {size[0]}x{size[1]} (HxW) is not a multiple of the encoder's patch size {patch}: "
                         f"pass --model.img_size with multiples of {patch}")


def run_dense(cfg, task: DenseTask) -> dict:
    """Train a dense head (and, with --finetune, the encoder) on `task`; score its evaluation split; write the
    result JSON, the task's outputs and (with --*.eval_every) the learning curve."""
    validate(cfg)
    rt = setup(cfg.run, cfg)
    d = rt.dist
    t0 = time.perf_counter()
    bb = encoder_init(cfg.init, cfg.model)
    data_cfg = data_for(bb, cfg.data)
    channels = task.channels(data_cfg)
    mean, std = source_norm_stats(data_cfg, channels)
    parts = task.build(cfg, rt, bb, data_cfg, channels, tuple(mean), tuple(std))
    model = parts.model.to(rt.device)
    head = model.head
    train_loader = parts.train_loader
    lr = schedule(cfg.optim, len(train_loader), d.world_size, train_loader.num_samples)
    groups = param_groups_dense(model, cfg.optim.weight_decay, cfg.finetune, cfg.layer_decay)
    optimizer = build_adamw(groups, lr.peak, cfg.optim.betas, rt.device)
    print0(d, f"{task.command}: {parts.describe} | lr {lr.peak:.3g} | {rt.precision_label} on {rt.device} "
              f"x{d.world_size}")

    def loss_fn(m: nn.Module, imgs: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        return head.loss(m(imgs), targets)

    meta = model_meta(task.kind, parts.model_kwargs, cfg, mean=list(mean), std=list(std), init=cfg.init,
                      **parts.meta)
    evaluator = task.evaluator(cfg, parts, rt)
    section = getattr(cfg, task.section)
    every = getattr(section, "eval_every", 0)
    scored: dict[int, tuple[Any, dict]] = {}  # epoch -> (predictions, metrics): the last epoch's is reused

    def score(epoch: int) -> tuple[Any, dict]:
        if epoch not in scored:
            result = inference(task.forward(cfg, model), model, parts.val_loader, evaluator, rt.device, rt.precision)
            scored.clear()
            scored[epoch] = result
        return scored[epoch]

    def on_epoch_end(epoch: int, m: nn.Module, progress) -> dict:
        if not every or ((epoch + 1) % every and epoch + 1 != cfg.optim.epochs):
            return {}
        return task.epoch_metrics(score(epoch)[1])

    fit_task = Task(model, optimizer, loss=loss_fn, lr=lr, meta=meta, accum_iter=cfg.optim.accum_iter,
                    clip_grad=cfg.optim.clip_grad, on_epoch_end=on_epoch_end)
    prog, last = fit(rt, fit_task, train_loader, cfg.optim.epochs)
    if prog.epoch < cfg.optim.epochs:  # stopped by a signal: the checkpoint is saved, run again to resume
        return {"epochs_done": prog.epoch, "last_checkpoint": str(last) if last else None}
    predictions, metrics = score(cfg.optim.epochs - 1)
    result = {**metrics, **parts.result, "init": cfg.init, "finetune": cfg.finetune, "epochs": cfg.optim.epochs,
              "train": parts.counts[0], "eval": parts.counts[1], "image_size": list(parts.size), "lr": lr.peak,
              "seconds": time.perf_counter() - t0, "last_checkpoint": str(last) if last else None}
    if d.is_main:
        written = task.write(cfg, parts, predictions, rt.out_dir)
        out = rt.out_dir / task.result
        atomic_write_text(json.dumps(result, indent=2, sort_keys=True), out)
        if every:
            plot_learning_curve(rt.out_dir / "log.jsonl", rt.out_dir / "learning_curve.png",
                                title=f"fastmae {task.command}", loss_label=task.loss_label, metric=task.metric)
        paths = ", ".join(str(p) for p in [out, *written])
        print0(d, f"{task.summary(cfg, result)}  ({paths})")
    return result


__all__ = ["DatasetEvaluator", "DenseParts", "DenseTask", "check_multiple", "encoder_mode", "inference", "percent",
           "run_dense"]
