"""The epoch loop shared by pretrain / finetune / linprobe: setup, auto-resume, checkpoints, preemption.

Commands build their model, data and loss, then call `fit`. Everything a resumed run needs to
continue bit-for-bit (weights, optimizer, scaler, epoch, batch, RNG) is in the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn

from .._version import __version__
from ..config import RunConfig, to_dict
from ..weights.checkpoint import (
    atomic_write_text,
    check_state_dict,
    checkpoint_number,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sharded_folder,
)
from ..weights.sharded import load_sharded, save_sharded
from .device import make_scaler, resolve_device, resolve_precision
from .dist import any_rank, barrier, gather_objects, init_distributed, print0
from .engine import EpochResult, Task, train_one_epoch
from .signals import StopFlag, Stopped
from .log import RunLogger, epoch_line, run_time_left
from .parallel import SHARDED_COMMANDS, fsdp_refusal, is_sharded, parallelize, unwrap_model, wrap_for_training
from .owner import COMMAND_OF_KIND, claim, command_of
from .runlock import acquire as acquire_lock
from .runtime import Progress, Runtime, position


def save_json(cfg, path: str | Path) -> None:
    """Write the resolved config as JSON atomically (checkpoint.atomic_write_text: fsync, rename, umask mode)."""
    atomic_write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True), path)


def prepare_output_dir(out: Path) -> None:
    """Create the run folder, or a one-line error naming --run.output_dir when it is a file or not writable."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--run.output_dir {out} is an existing file, not a folder; pass another --run.output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file somewhere above it
        raise ValueError(f"cannot create --run.output_dir {out}: a file is in the way of a folder on its path; "
                         f"pass another --run.output_dir") from None
    except OSError as e:  # EACCES, EROFS, ENOSPC, ...
        raise PermissionError(f"cannot create --run.output_dir {out} ({e.strerror}); pass a writable "
                              f"--run.output_dir") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"--run.output_dir {out} is not writable; fix its permissions or pass another "
                              f"--run.output_dir")


def setup(run: RunConfig, cfg, write_config: bool = True) -> Runtime:
    """Device, precision, threads, process group, seeds; rank 0 creates and locks the run folder.

    config.json is written here for a fresh run; a run that will resume writes it in `fit`, after the checkpoint
    was checked against the new flags, so a refused command never overwrites the config of the run it refused.
    write_config=False leaves it to the command (the evaluation commands write it with their result).
    """
    command = command_of(cfg)
    if getattr(run, "parallel", "ddp") == "fsdp" and command and command not in SHARDED_COMMANDS:
        raise ValueError(fsdp_refusal(f"`fastmae {command}`"))  # before any folder, process group or work
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    if run.num_threads > 0:
        torch.set_num_threads(run.num_threads)
    dist = init_distributed(device.type, run.dist_timeout)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    torch.manual_seed(run.seed + dist.rank)  # masks and drop-path differ per rank; DDP syncs the weights
    out = Path(run.output_dir)
    lock = None
    if dist.is_main:
        prepare_output_dir(out)
        lock = acquire_lock(out)
        if command:
            claim(out, command)
    logger = RunLogger(out, enabled=dist.is_main)  # checks its paths: a refused run writes nothing
    if dist.is_main and write_config and not (run.resume or find_latest(out)):
        save_json(cfg, out / "config.json")
    barrier(dist)
    return Runtime(device=device, precision=precision.name, precision_label=str(precision), dist=dist, out_dir=out,
                   logger=logger, run=run, config=to_dict(cfg), lock=lock)


def flat_flags(d: dict, prefix: str = "--") -> dict[str, object]:
    """{'--section.field': value} of a nested config dict (JSON form: tuples are lists)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_flags(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """'--flag old -> new' for every flag whose value differs between two config dicts."""
    a, b = flat_flags(json.loads(json.dumps(old))), flat_flags(json.loads(json.dumps(new)))
    return [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(path, saved: dict, new: dict) -> None:
    """Refuse resuming with another --init or changed --model.* flags (mask ratio, target, sizes): the run would
    silently become another experiment (its checkpoint's weights win over --init). Other changes (e.g. more
    --optim.epochs) are allowed; `fit` reports them."""
    if saved and new and saved.get("init", "") != new.get("init", ""):  # the checkpoint's weights would win
        raise ValueError(f"refusing to resume {path}: that run started from --init {saved.get('init') or '(none)'}, "
                         f"this command gives --init {new.get('init') or '(none)'}; pass another --run.output_dir to "
                         f"start a new run, or the run's own --init to go on with it")
    changed = config_changes(saved.get("model", {}), new.get("model", {})) if saved and new else []
    if changed:
        changed = [c.replace("--", "--model.", 1) for c in changed]
        raise ValueError(f"refusing to resume {path} with changed model flags ({'; '.join(changed)}); use the flags "
                         f"the run was started with, or pass another --run.output_dir to start a new run")


def restore_rank_state(rt: Runtime, state: dict, prog: "Progress") -> None:
    """This rank's RNG (and running epoch loss) from the checkpoint, so a DDP job resumes bit-for-bit.

    Checkpoints hold every rank's state in 'rank_states' (older ones, and other world sizes, only rank 0's
    'rng': then ranks > 0 are reseeded apart, so they at least do not all draw the same masks).
    """
    ranks = state.get("rank_states") or []
    if len(ranks) == rt.dist.world_size:
        mine = ranks[rt.dist.rank]
        set_rng_state(mine["rng"])
        if prog.batch > 0:
            prog.loss_sum, prog.loss_count = float(mine.get("loss_sum", 0.0)), int(mine.get("loss_count", 0))
        return
    set_rng_state(state["rng"])
    if rt.dist.rank > 0:
        torch.manual_seed(rt.run.seed + rt.dist.rank + 1_000_003 * int(state.get("step", 0)))
    if ranks:
        print0(rt.dist, f"note: the checkpoint was written by {len(ranks)} process(es), this job has "
                        f"{rt.dist.world_size}: random streams restart, the run is not bit-for-bit anymore")


def resume(rt: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler | None, meta: dict | None = None, steps_per_epoch: int = 0) -> Progress:
    """Load --run.resume, or the newest checkpoint in the output folder, if any; else start fresh.

    With `meta` (the new run's checkpoint metadata), changed model flags are refused (check_resume_config).
    A checkpoint written mid-epoch continues only with the batches per epoch it was written with: with other
    data, batch size or process count its batch position means nothing (at an epoch's end any change is fine).
    """
    path = rt.run.resume or find_latest(rt.out_dir)
    if not path:
        return Progress(steps_per_epoch=steps_per_epoch)
    try:
        state, saved_meta = load_checkpoint(path, with_model=False)
    except ValueError as e:  # damaged (a copy cut short, a full disk when it was written elsewhere)
        if rt.run.resume:
            raise
        older = list_checkpoints(rt.out_dir)[:-1]
        raise ValueError(f"{e}. To resume from the checkpoint before it ({older[-1]}), move the damaged one and its "
                         f".json out of the folder (mv {path} {path}.damaged)" if older else
                         f"{e}. It is the run's only checkpoint: move it out of the folder to start the run afresh, "
                         f"or pass another --run.output_dir") from None
    if "optimizer" not in state and not state.get("sharded"):
        raise ValueError(f"{path} is a weights-only file, not a training checkpoint; pass it as the "
                         f"initialisation (e.g. --init PATH) instead of --run.resume")
    kinds = (saved_meta.get("kind"), (meta or {}).get("kind"))
    if all(kinds) and kinds[0] != kinds[1]:
        raise ValueError(f"{path} is a checkpoint of another command ({COMMAND_OF_KIND.get(kinds[0], kinds[0])}), "
                         f"not of this {COMMAND_OF_KIND.get(kinds[1], kinds[1])} run; pass another --run.output_dir "
                         f"(to start from its weights: --init {Path(path).parent})")
    if "model" in state:  # a sharded checkpoint's shapes are checked by DCP as it loads
        check_state_dict(state["model"], {k: tuple(v.shape) for k, v in model.state_dict().items()},
                         f"this run's model (checkpoint {path})",
                         advice="Use the same model flags as the run that wrote it, or a fresh output directory.")
    check_resume_config(path, saved_meta.get("config", {}), (meta or {}).get("config", {}))
    folder = sharded_folder(path, state)
    if folder is not None:  # --run.parallel fsdp wrote it: DCP re-shards onto this job's processes
        load_sharded(model, optimizer, folder)
    elif is_sharded(model):
        raise ValueError(f"{path} was written by a run without --run.parallel fsdp; resume it with the parallelism it "
                         f"was started with (--run.parallel ddp), or pass another --run.output_dir")
    else:
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    prog = Progress(epoch=int(state["epoch"]), batch=int(state["batch"]), resumed_from=str(path),
                    extra=dict(state.get("extra", {})), steps_per_epoch=steps_per_epoch,
                    resumed_at=(int(state["epoch"]), int(state["batch"])))
    saved = int(state.get("steps_per_epoch", 0)) or (  # older checkpoints: from step = epoch x per epoch + batch
        (int(state["step"]) - prog.batch) // prog.epoch if prog.epoch else 0)
    if prog.batch and steps_per_epoch and saved and saved != steps_per_epoch:
        raise ValueError(f"{path} stopped at batch {prog.batch} of {saved} in epoch {prog.epoch + 1}, but this run "
                         f"has {steps_per_epoch} batches per epoch (the data, --optim.batch_size or the number of "
                         f"processes changed), so that epoch cannot go on where it stopped; resume with the settings "
                         f"it was started with, or pass another --run.output_dir")
    restore_rank_state(rt, state, prog)
    return prog


def write_config(rt: Runtime) -> Path:
    """This run's resolved config as config.json in its folder, atomically (rank 0 calls it)."""
    return atomic_write_text(json.dumps(rt.config, indent=2, sort_keys=True), rt.out_dir / "config.json")


def write_resumed_config(rt: Runtime) -> None:
    """config.json of a resumed run: rewritten with the new flags, naming what changed (rank 0)."""
    if not rt.dist.is_main or not rt.config:
        return
    path = rt.out_dir / "config.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    changed = config_changes(old, rt.config) if old else []
    if changed:
        print0(rt.dist, f"config.json updated for the resumed run: {'; '.join(changed)}")
    if changed or not old:
        write_config(rt)


def save(rt: Runtime, model: nn.Module, optimizer, scaler, progress: Progress, step: int, meta: dict) -> Path | None:
    """Checkpoint on rank 0 (all ranks wait), pruning old ones per --run.keep_last.

    Every rank's RNG state and running epoch loss are gathered into 'rank_states' (rank 0's RNG also stays in
    'rng'), so each rank of a resumed DDP job continues its own random stream.
    """
    path = None
    mine = {"rng": rng_state(), "loss_sum": progress.loss_sum, "loss_count": progress.loss_count}
    ranks = gather_objects(mine, rt.dist)
    sharded_tmp = None
    if is_sharded(model):  # every rank writes its shards (DCP), into a temporary folder rank 0 then moves in place
        number = gather_objects(checkpoint_number(rt.out_dir, {"epoch": progress.epoch, "batch": progress.batch,
                                                               "step": step}) if rt.dist.is_main else 0, rt.dist)[0]
        sharded_tmp = rt.out_dir / f".dcp-{number:08d}.tmp"
        if rt.dist.is_main:
            shutil.rmtree(sharded_tmp, ignore_errors=True)  # left by a killed save
        barrier(rt.dist)
        save_sharded(model, optimizer, sharded_tmp)
    if rt.dist.is_main:
        weights = {} if sharded_tmp else {"model": unwrap_model(model).state_dict(),
                                          "optimizer": optimizer.state_dict()}
        state = {
            **weights,
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": progress.epoch,
            "batch": progress.batch,
            "step": step,
            "steps_per_epoch": progress.steps_per_epoch,
            "rng": mine["rng"],
            "rank_states": ranks,
            "extra": progress.extra,
        }
        path = save_checkpoint(rt.out_dir, state, {**meta, "fastmae_version": __version__}, rt.run.keep_last,
                               sharded_tmp=sharded_tmp)
    barrier(rt.dist)
    return path


# log.jsonl's epoch key for the run's wall-clock seconds so far: training and epoch-end evaluation, summed over every
# process that ran it (a resumed run continues its count; time stopped does not count), for time-to-accuracy curves.
ELAPSED = "elapsed_seconds"


def fit(rt: Runtime, task: Task, loader, epochs: int) -> tuple[Progress, Path | None]:
    """Train task.model from where the output folder left off to `epochs` epochs: resume, then per epoch
    train, log, run task.on_epoch_end and checkpoint; a stop signal (preemption) saves mid-epoch and returns.

    Returns the final progress and the last checkpoint written.
    """
    scaler = make_scaler(rt.device, rt.precision)
    stop = StopFlag()
    last_path: Path | None = None
    try:
        # activation checkpointing and FSDP2 sharding, in place, before any state is loaded into model and optimizer
        task.optimizer = parallelize(rt, task.model, task.optimizer, task.shardable)
        prog = resume(rt, task.model, task.optimizer, scaler, task.meta, steps_per_epoch=len(loader))
        if prog.resumed_from:
            print0(rt.dist, f"resumed from {prog.resumed_from} {position(prog.epoch, prog.batch)}")
            write_resumed_config(rt)
        model = wrap_for_training(rt, task.model)
        stop.install()
        walls: list[tuple[float, int]] = []  # this process's epochs (seconds incl. evaluation, batches): time left
        while prog.epoch < epochs:
            epoch, t_epoch, first_batch = prog.epoch, time.perf_counter(), prog.batch
            res: EpochResult = train_one_epoch(task, model, loader, rt, prog, scaler, stop, epochs)
            step = epoch * len(loader) + prog.batch + res.steps
            if res.stopped:  # preempted: save where this epoch stopped, and leave
                prog.extra[ELAPSED] = prog.extra.get(ELAPSED, 0.0) + time.perf_counter() - t_epoch
                prog.batch += res.steps
                prog.loss_sum, prog.loss_count = res.loss_sum, res.loss_count
                last_path = save(rt, task.model, task.optimizer, scaler, prog, step, task.meta)
                rt.logger.record({"event": "preempted", "epoch": epoch, "batch": prog.batch, "step": step,
                                  "checkpoint": str(last_path)})
                print0(rt.dist, f"{stop.describe()}: saved {last_path}; run the same command again to resume")
                return prog, last_path
            prog.epoch, prog.batch, prog.loss_sum, prog.loss_count = epoch + 1, 0, 0.0, 0
            entry = {"epoch": epoch + 1, "step": step, "loss": res.loss, "lr": task.lr(step),
                     "images_per_s": res.images / max(res.seconds, 1e-9), "epoch_seconds": res.seconds,
                     **(res.terms or {})}
            if task.on_epoch_end is not None:
                try:  # a stop does not wait for an epoch-end evaluation (a DDP job's ranks finish it together)
                    with stop.interrupting(enabled=not rt.dist.distributed):
                        entry.update(task.on_epoch_end(epoch, task.model, prog))
                except Stopped as e:
                    entry["epoch_end_skipped"] = f"signal {e.signum}"
            prog.extra[ELAPSED] = prog.extra.get(ELAPSED, 0.0) + time.perf_counter() - t_epoch
            entry[ELAPSED] = prog.extra[ELAPSED]  # the run's time to here (its epochs and their evaluations)
            rt.logger.scalars(step, {"epoch_loss": res.loss}, prefix="epoch")
            rt.logger.record(entry)
            walls.append((time.perf_counter() - t_epoch, len(loader) - first_batch))
            print0(rt.dist, epoch_line(entry, epochs, run_time_left(walls, (epochs - epoch - 1) * len(loader))))
            got = stop.signal is not None  # a signal during the epoch's last batch or its evaluation
            stopping = any_rank(got, rt.dist, rt.device) if rt.dist.distributed else got
            if stopping or (epoch + 1) % max(rt.run.save_every, 1) == 0 or epoch + 1 == epochs:
                last_path = save(rt, task.model, task.optimizer, scaler, prog, step, task.meta)
            if stopping and prog.epoch < epochs:  # preempted at an epoch's end: saved, leave
                rt.logger.record({"event": "preempted", "epoch": prog.epoch, "batch": 0, "step": step,
                                  "checkpoint": str(last_path)})
                print0(rt.dist, f"{stop.describe()}: saved {last_path}; run the same command again to resume")
                return prog, last_path
    finally:
        stop.uninstall()
        rt.logger.close()
    # the folder stays locked until the command ends (cli.main releases it; so does interpreter exit): what a command
    # writes after training (its final evaluation, result files) must not meet a second run in the same folder
    return prog, last_path or find_latest(rt.out_dir)


def model_meta(kind: str, model_kwargs: dict, cfg, **extra) -> dict:
    """Checkpoint metadata: what to build to load the weights, and the resolved config."""
    return {"kind": kind, "model_kwargs": model_kwargs, "config": to_dict(cfg), **extra}
