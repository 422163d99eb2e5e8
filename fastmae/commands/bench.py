"""`fastmae bench`: is this machine fast enough, and is the loader or the model the limit?

For the model of --model.* it times one pretraining step (MAE) and one fine-tuning step (classification ViT
on all tokens) with the same timing code as benchmarks/bench_model.py (warm-up, interleaved rounds, medians),
reports img/s, ms/step, peak memory, FLOPs per image and the share of this machine's measured matmul peak,
and times the training loader of --data.* alone. With --compare hf, transformers' models of the same sizes run
side by side and each row gets its speed ratio.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ..bench.cases import COMPILED, Case, hf_available
from ..bench.report import add_peak_shares, machine_info, markdown_table
from ..bench.timing import bench_case_fitting, matmul_peak_tflops, read_status_kb
from ..config import (
    NON_NEGATIVE,
    POSITIVE_INT,
    PRETRAIN_CROP_SCALE,
    DataConfig,
    MAEModelConfig,
    Rule,
    above,
    validate,
)
from ..train.device import resolve_device, resolve_precision
from ..weights.checkpoint import atomic_write_text

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae bench --help`).

@dataclass(frozen=True)
class BenchParams:
    """What to time and for how long."""

    RULES: ClassVar[dict[str, Rule]] = {"batch_size": POSITIVE_INT, "num_classes": POSITIVE_INT, "rounds": POSITIVE_INT,
                  "round_seconds": above(0), "data_batches": POSITIVE_INT, "quiet_wait": NON_NEGATIVE,
                  "tasks": ((lambda v: len(v) > 0), "one or more of pretrain finetune data")}

    tasks: tuple[Literal["pretrain", "finetune", "data"], ...] = ("pretrain", "finetune", "data")
    """pretrain: one MAE train step; finetune: one classification-ViT train step on all tokens; data: the
    training loader of --data.* alone (img/s with --data.num_workers workers)."""
    batch_size: int = 128
    num_classes: int = 10
    """Classes of the fine-tuning head."""
    rounds: int = 3
    """Timed rounds per implementation (interleaved with --compare hf); the table shows medians."""
    round_seconds: float = 2.0
    """Target seconds per round."""
    data_batches: int = 20
    """Batches the loader timing reads (after one warm-up batch)."""
    quiet_wait: float = 5.0
    """On a CPU, wait up to this many seconds before each round for other processes to go idle (0 = never):
    a step timed while another process takes a core is several times slower."""


@dataclass(frozen=True)
class BenchRunConfig:
    """Where and how the steps run."""

    RULES: ClassVar[dict[str, Rule]] = {"num_threads": NON_NEGATIVE}

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = the rule every command uses (bf16 only where the CPU or GPU computes it natively)."""
    compile: bool = False
    """Also time torch.compile(model) (its first step compiles: 30-60 s on a CPU)."""
    num_threads: int = 0
    """torch intra-op threads (0 = leave torch's default)."""
    output: str = ""
    """Also write the results as JSON to this file ('' = print only)."""


@dataclass(frozen=True)
class BenchConfig:
    """Speed on this machine: train-step img/s, ms/step, peak memory, FLOPs/img and share of the measured matmul
    peak for a model, and how much of the step its matmuls alone take; the data loader's img/s beside it; with
    --compare hf, Hugging Face side by side."""

    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=PRETRAIN_CROP_SCALE))
    bench: BenchParams = field(default_factory=BenchParams)
    run: BenchRunConfig = field(default_factory=BenchRunConfig)
    compare: Literal["none", "hf"] = "none"
    """hf: time transformers' ViTMAEForPreTraining / ViTForImageClassification of the same sizes, interleaved."""


@dataclasses.dataclass(frozen=True)
class Timing:
    """The knobs bench_case reads (benchmarks/bench_model.py passes its argparse namespace instead)."""

    rounds: int = 3
    max_rounds: int = 6
    round_seconds: float = 2.0
    steps: int = 0
    warmup: int = 2
    compile_warmup: int = 3
    optim_impl: str = "default"
    quiet_wait: float = 5.0
    min_cpu_share: float = 0.9
    ceiling: bool = True  # also replay each step's own matmuls alone (fastmae.bench.ceiling)


def in_chans(cfg: BenchConfig) -> int:
    """The model's input channels: --model.in_chans, else the data's (1 for Fashion-MNIST, else --data.channels or 3)."""
    if cfg.model.in_chans:
        return cfg.model.in_chans
    return cfg.data.channels or (1 if cfg.data.source == "fashion-mnist" else 3)


def make_case(cfg: BenchConfig, task: str) -> Case:
    """The benchmark Case of --model.* (variant + overrides, as `fastmae pretrain` builds it) for a task."""
    from ..weights.backbone import mae_kwargs

    kw = mae_kwargs(cfg.model, in_chans(cfg))
    H, W = kw["img_size"]
    ft = task == "finetune"
    return Case(
        name=task, title=f"{cfg.model.name} {H}x{W}", img_size=H if H == W else (H, W),
        patch_size=kw["patch_size"], embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"],
        decoder_embed_dim=0 if ft else kw["decoder_embed_dim"], decoder_depth=0 if ft else kw["decoder_depth"],
        decoder_num_heads=0 if ft else kw["decoder_num_heads"], batch=cfg.bench.batch_size, in_chans=kw["in_chans"],
        mlp_ratio=kw.get("mlp_ratio", 4.0), task=task, num_classes=cfg.bench.num_classes,
        decoder=kw.get("decoder", "self") if not ft else "self", kept_mask_ratio=kw.get("kept_mask_ratio", 0.0),
    )


def bench_loader(cfg: BenchConfig, img_size: tuple[int, int], uint8: bool = True):
    """The training loader of --data.* that `time_loader` times, built (and checked) before any timing: a missing
    path or data smaller than two batches fails in a second, not after the model's rounds."""
    from ..data import build_loader

    loader = build_loader(cfg.data, "train", img_size, cfg.bench.batch_size, train=True, uint8=uint8)
    if len(loader) < 2:
        raise ValueError(f"--data.* gives {len(loader)} training batch{'es' if len(loader) != 1 else ''} of "
                         f"{cfg.bench.batch_size}: the loader is timed over batches after the first, so it needs two; "
                         f"pass a smaller --bench.batch_size or more data")
    return loader


def time_loader(loader, batches: int, num_workers: int, device: torch.device | None = None) -> dict:
    """Training-loader img/s of --data.* alone (decode, crop, resize, normalise; no model), batches delivered on
    `device`; with the bytes of a batch as the loader's workers send it."""
    if device is not None:
        loader.set_device(device)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)  # workers start and the first batch is ready: not counted
    n, t0 = 0, time.perf_counter()
    for _ in range(min(batches, len(loader) - 1)):
        imgs, _ = next(it)
        n += imgs.shape[0]
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if hasattr(loader, "close"):
        loader.close()
    sent = 1 if getattr(loader, "sends_uint8", False) else 4
    return {"images": n, "seconds": seconds, "img_per_s": n / max(seconds, 1e-9), "num_workers": num_workers,
            "batch_bytes": imgs.numel() * sent}


def time_transports(cfg: BenchConfig, loader, device: torch.device, workers: int) -> dict:
    """A file loader timed twice each, alternately, against one of the same data normalising in its workers
    (float32, 4x the bytes): the default, workers sending uint8 pixels normalised on `device`; their img/s, bytes
    per batch, and the share of the workers' time the uint8 transport saves."""
    loaders = {True: loader, False: bench_loader(cfg, loader.img_size, uint8=False)}
    rates: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(2):
        for uint8 in (True, False):  # time_loader closes the loader's workers; the next round starts new ones
            rates[uint8].append(time_loader(loaders[uint8], cfg.bench.data_batches, workers, device))
    best = {k: max(v, key=lambda r: r["img_per_s"]) for k, v in rates.items()}
    return {**best[True], "float32_img_per_s": best[False]["img_per_s"], "float32_batch_bytes": best[True][
        "batch_bytes"] * 4, "uint8_speedup": best[True]["img_per_s"] / max(best[False]["img_per_s"], 1e-9)}


def nbytes(n: float) -> str:
    """A size in the unit that shows it: '9.2 MiB', '48.0 KiB', '512 B'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def run_bench(cfg: BenchConfig) -> dict:
    """Time the steps and the loader; print the table and the verdict; return everything as a dict."""
    validate(cfg)
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    if cfg.compare == "hf" and not hf_available():
        raise ValueError("--compare hf needs transformers: pip install transformers (or fastmae[hf])")
    if cfg.run.output:  # refused before the rounds, not after them
        out = Path(cfg.run.output)
        if out.is_dir():
            raise ValueError(f"--run.output {out} is a folder; pass a file name, e.g. {out / 'bench.json'}")
        if out.exists():
            raise ValueError(f"--run.output {out} exists (an earlier run's results); pass another --run.output or "
                             f"remove it first")
    loader = bench_loader(cfg, tuple(cfg.model.img_size)) if "data" in cfg.bench.tasks else None
    impls = ["fastmae"] + ([COMPILED] if cfg.run.compile else []) + (["hf"] if cfg.compare == "hf" else [])
    timing = Timing(rounds=cfg.bench.rounds, max_rounds=2 * cfg.bench.rounds, round_seconds=cfg.bench.round_seconds,
                    quiet_wait=cfg.bench.quiet_wait, optim_impl="fused")  # the AdamW fastmae trains with, for both
    info = machine_info(device)
    print(f"# {info.get('gpu') or info.get('cpu', 'unknown CPU')} | torch {torch.__version__} | "
          f"{torch.backends.cpu.get_cpu_capability()} | {precision} on {device} x{torch.get_num_threads()} threads",
          flush=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision.name]
    peak = matmul_peak_tflops(dtype, device)
    rows: list[dict] = []
    for task in (t for t in ("pretrain", "finetune") if t in cfg.bench.tasks):
        case = make_case(cfg, task)
        cases = [case]
        if case.decoder == "cross":  # its step beside MAE's own decoder of the same sizes (Hugging Face has only that)
            cases = [dataclasses.replace(case, decoder="self", kept_mask_ratio=0.0),
                     dataclasses.replace(case, name="pretrain-cross",
                                         title=f"{case.title} cross decoder, kept {case.kept_mask_ratio:g}")]
        for c in cases:
            these = [i for i in impls if c.decoder == "self" or i != "hf"]
            rows += bench_case_fitting(c, precision.name, these, timing, device)["rows"]
            for r in rows[-len(these):]:
                r["gflops_per_img"] = r["train_flops_per_step"] / r["batch"] / 1e9
    peaks = {precision.name: max(peak, matmul_peak_tflops(dtype, device))}
    add_peak_shares(rows, peaks)
    result: dict = {"machine": info, "precision": str(precision), "matmul_peak_tflops": peaks[precision.name],
                    "rows": rows, "peak_rss_mib": read_status_kb("VmHWM") / 1024}
    if rows:
        print(markdown_table(rows, peaks))
        print("# FLOPs per image per train step: " + ", ".join(
            f"{r['case']} {r['gflops_per_img']:.2f} G" for r in rows if r["impl"] == "fastmae")
              + f"; matmul peak {peaks[precision.name]:.3f} TFLOP/s ({precision.name}); process peak RSS "
              f"{result['peak_rss_mib']:.0f} MiB")
    if "data" in cfg.bench.tasks:
        workers = cfg.data.num_workers if cfg.data.source != "fashion-mnist" else 0
        if getattr(loader, "sends_uint8", False):  # file workers: their uint8 transport against float32
            result["loader"] = loader = time_transports(cfg, loader, device, workers)
        else:
            result["loader"] = loader = time_loader(loader, cfg.bench.data_batches, workers, device)
        model_ips = next((r["img_per_s"] for r in rows if r["case"] == "pretrain" and r["impl"] == "fastmae"), None)
        n = loader["num_workers"]
        who = "in the main process" if n == 0 else f"{n} worker{'s' if n > 1 else ''}"
        line = f"# loader ({cfg.data.source}, {who}): {loader['img_per_s']:.0f} img/s"
        if "float32_img_per_s" in loader:
            line += (f" with uint8 batches of {nbytes(loader['batch_bytes'])} normalised on {device}, "
                     f"{loader['float32_img_per_s']:.0f} img/s with float32 batches of "
                     f"{nbytes(loader['float32_batch_bytes'])} normalised in the workers: uint8 at "
                     f"{loader['uint8_speedup']:.2f}x the rate")
        if model_ips:
            limit = "the loader" if loader["img_per_s"] < model_ips else "the model"
            line += f" vs pretraining step {model_ips:.0f} img/s: {limit} is the limit"
            result["limit"] = limit
        print(line, flush=True)
    if cfg.run.output:
        atomic_write_text(json.dumps(result, indent=2, default=str), Path(cfg.run.output))
    return result
