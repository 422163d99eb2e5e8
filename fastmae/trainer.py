"""The epoch loop shared by pretrain / finetune / linprobe: setup, auto-resume, checkpoints, preemption.

Commands build their model, data and loss, then call `fit`. Everything a resumed run needs to
continue bit-for-bit (weights, optimizer, scaler, epoch, batch, RNG) is in the checkpoint.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ._version import __version__
from .checkpoint import (
    check_state_dict,
    find_latest,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import RunConfig, save_json, to_dict
from .device import make_scaler, resolve_device, resolve_precision
from .dist import DistInfo, barrier, init_distributed, print0
from .engine import EpochResult, train_one_epoch
from .log import RunLogger


@dataclass
class Runtime:
    """Resolved device, precision, process group, output folder and logger of one run."""

    device: torch.device
    precision: str  # 'bf16', 'fp16' or 'fp32'
    precision_label: str  # for the startup line: 'fp32 (no native bf16 on this CPU)' when auto fell back
    dist: DistInfo
    out_dir: Path
    logger: RunLogger
    run: RunConfig


def setup(run: RunConfig, cfg) -> Runtime:
    """Device, precision, threads, process group, seeds; writes config.json on rank 0."""
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    if run.num_threads > 0:
        torch.set_num_threads(run.num_threads)
    dist = init_distributed(device.type, run.dist_timeout)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    torch.manual_seed(run.seed + dist.rank)  # masks and drop-path differ per rank; DDP syncs the weights
    out = Path(run.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, out / "config.json")
    barrier(dist)
    logger = RunLogger(out, enabled=dist.is_main)
    return Runtime(device=device, precision=precision.name, precision_label=str(precision), dist=dist, out_dir=out,
                   logger=logger, run=run)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (preemption): the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@dataclass
class Progress:
    epoch: int = 0  # epoch to run next
    batch: int = 0  # batch index inside that epoch to start from
    resumed_from: str = ""
    extra: dict = field(default_factory=dict)  # command-specific state (e.g. best accuracy)


def resume(rt: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler | None) -> Progress:
    """Load --run.resume, or the newest checkpoint in the output folder, if any; else start fresh."""
    path = rt.run.resume or find_latest(rt.out_dir)
    if not path:
        return Progress()
    state, _ = load_checkpoint(path)
    if "optimizer" not in state:
        raise ValueError(f"{path} is a weights-only file, not a training checkpoint; pass it as the "
                         f"initialisation (e.g. --init PATH) instead of --run.resume")
    check_state_dict(state["model"], {k: tuple(v.shape) for k, v in model.state_dict().items()},
                     f"this run's model (checkpoint {path})",
                     advice="Use the same model flags as the run that wrote it, or a fresh output directory.")
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return Progress(epoch=int(state["epoch"]), batch=int(state["batch"]), resumed_from=str(path),
                    extra=dict(state.get("extra", {})))


def save(rt: Runtime, model: nn.Module, optimizer, scaler, progress: Progress, step: int, meta: dict) -> Path | None:
    """Checkpoint on rank 0 (all ranks wait), pruning old ones per --run.keep_last."""
    path = None
    if rt.dist.is_main:
        state = {
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": progress.epoch,
            "batch": progress.batch,
            "step": step,
            "rng": rng_state(),
            "extra": progress.extra,
        }
        path = save_checkpoint(rt.out_dir, state, {**meta, "fastmae_version": __version__}, rt.run.keep_last)
    barrier(rt.dist)
    return path


def fit(
    rt: Runtime,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    *,
    epochs: int,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    lr_fn: Callable[[int], float],
    meta: dict,
    accum_iter: int = 1,
    clip_grad: float = 0.0,
    on_epoch_end: Callable[[int, nn.Module, Progress], dict] | None = None,
    check_every: int = 0,
) -> tuple[Progress, Path | None]:
    """Train from the resumed position to `epochs`; returns the final progress and checkpoint path.

    `model` is the raw module (checkpoints store its state); DDP / compile wrapping happens here.
    """
    scaler = make_scaler(rt.device, rt.precision)
    prog = resume(rt, model, optimizer, scaler)
    if prog.resumed_from:
        print0(rt.dist, f"resumed from {prog.resumed_from} at epoch {prog.epoch}, batch {prog.batch}")
    train_model: nn.Module = model
    if rt.run.compile:
        train_model = torch.compile(train_model)
    if rt.dist.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
    steps_per_epoch = len(loader)
    check_every = check_every or (1 if rt.device.type == "cpu" else 20)
    stop = StopFlag()
    stop.install()
    last_path: Path | None = None
    tb_every = max(1, steps_per_epoch // 20)

    def on_step(step: int, loss: float, lr: float, ips: float) -> None:
        if step % tb_every == 0:
            rt.logger.scalars(step, {"loss": loss, "lr": lr, "images_per_s": ips})

    try:
        while prog.epoch < epochs:
            epoch = prog.epoch
            loader.set_epoch(epoch, start_batch=prog.batch)
            first = epoch * steps_per_epoch + prog.batch
            res: EpochResult = train_one_epoch(
                train_model, loader, optimizer, loss_fn=loss_fn, lr_fn=lr_fn, first_step=first,
                num_batches=steps_per_epoch - prog.batch, device=rt.device, precision=rt.precision,
                dist=rt.dist, accum_iter=accum_iter, clip_grad=clip_grad, scaler=scaler,
                stop_requested=stop, on_step=on_step, show_progress=rt.run.progress and rt.dist.is_main,
                desc=f"epoch {epoch + 1}/{epochs}", check_every=check_every,
            )
            step = first + res.steps
            if res.stopped:
                prog.batch += res.steps
                last_path = save(rt, model, optimizer, scaler, prog, step, meta)
                rt.logger.record({"event": "preempted", "epoch": epoch, "batch": prog.batch, "step": step,
                                  "checkpoint": str(last_path)})
                print0(rt.dist, f"signal {stop.signal}: saved {last_path}; run the same command again to resume")
                return prog, last_path
            prog.epoch, prog.batch = epoch + 1, 0
            entry = {"epoch": epoch + 1, "step": step, "loss": res.loss, "lr": lr_fn(step),
                     "images_per_s": res.images / max(res.seconds, 1e-9), "epoch_seconds": res.seconds}
            if on_epoch_end is not None:
                entry.update(on_epoch_end(epoch, model, prog))
            rt.logger.scalars(step, {"epoch_loss": res.loss}, prefix="epoch")
            rt.logger.record(entry)
            print0(rt.dist, json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in entry.items()}))
            if (epoch + 1) % max(rt.run.save_every, 1) == 0 or epoch + 1 == epochs:
                last_path = save(rt, model, optimizer, scaler, prog, step, meta)
    finally:
        stop.uninstall()
        rt.logger.close()
    if last_path is None:
        last_path = find_latest(rt.out_dir)
    return prog, last_path


def model_meta(kind: str, model_kwargs: dict, cfg, **extra) -> dict:
    """Checkpoint metadata: what to build to load the weights, and the resolved config."""
    return {"kind": kind, "model_kwargs": model_kwargs, "config": to_dict(cfg), **extra}
