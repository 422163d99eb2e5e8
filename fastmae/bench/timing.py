"""How it is timed: the measured square-matmul peak, warm-up, and interleaved rounds (A, B, then B, A, ...)
with a contention filter on a shared CPU (a round counts when every implementation kept its threads busy)."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path

import torch

from .cases import COMPILED, Case, Runner, median_seconds, sync
from .ceiling import step_ceiling


def peak_matmul_size(device: torch.device) -> int:
    """Side n of the square matmul that measures the peak: 2048 on a CPU, 8192 on a GPU (big enough to fill it)."""
    return 8192 if device.type == "cuda" else 2048


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, n: int = 0, reps: int = 7) -> float:
    """Median TFLOP/s of an n x n x n matmul in `dtype` on random data: the machine's practical matmul peak.

    n = 0 picks `peak_matmul_size`. On a GPU each timing covers 10 products between synchronisations, so
    launch and synchronisation overhead stay out of the figure; the operands are drawn on the device.
    """
    n = n or peak_matmul_size(device)
    inner = 10 if device.type == "cuda" else 1
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    for _ in range(2):
        a @ b

    def products() -> None:
        for _ in range(inner):
            a @ b

    return 2 * n**3 / (median_seconds(products, device, reps) / inner) / 1e12


def gpu_memory_mark(device: torch.device) -> int:
    """On a GPU: reset the peak-memory counter and return the bytes allocated now; 0 on a CPU."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def free_gpu_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks, so the next case (or a retry at a smaller batch) starts clean."""
    if device.type != "cuda":
        return
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def build_and_warm_up(impl: str, case: Case, precision: str, args, device: torch.device) -> tuple[Runner, dict]:
    """Build one implementation and run its warm-up steps (the compiled one compiles in its first step).

    Returns the runner and its warm-up record: first and last warm-up step times and, on a GPU, the peak
    memory this implementation allocated ('peak_mem_gib'). Runners built earlier sit idle meanwhile, so
    their memory is the constant taken off as `before`.
    """
    before = gpu_memory_mark(device)
    r = Runner(impl, case, precision, device, args.optim_impl)
    sync(device)
    t0 = time.perf_counter()
    loss = r.step()  # for the compiled model this step includes compiling forward and backward
    sync(device)
    first = last = time.perf_counter() - t0
    n_warm = max(args.warmup, 2) + (args.compile_warmup if impl == COMPILED else 0)
    for _ in range(n_warm - 1):
        t0 = time.perf_counter()
        loss = r.step()
        sync(device)
        last = time.perf_counter() - t0
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"{impl} case {case.name} {precision}: loss is {loss.item()}")
    warm = {"first_step_s": first, "last_warmup_step_s": last, "warmup_steps": n_warm}
    if device.type == "cuda":
        warm["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    return r, warm


def bench_case_fitting(case: Case, precision: str, impls: list[str], args, device: torch.device,
                       min_batch: int = 8) -> dict:
    """`bench_case` at the case's batch; after a CUDA out-of-memory error, again at half the batch.

    Rows record the batch that ran ('batch') and the one asked for ('batch_requested').
    """
    batch = case.batch
    while True:
        oom = False
        try:
            res = bench_case(dataclasses.replace(case, batch=batch), precision, impls, args, device)
        except torch.OutOfMemoryError:
            oom = True  # handled below, outside the except block, so the failed runners' frames are freed first
        free_gpu_memory(device)
        if not oom:
            for row in res["rows"]:
                row["batch_requested"] = case.batch
            return res
        if batch // 2 < min_batch:
            raise RuntimeError(f"case {case.name} {precision}: out of memory even at batch {batch}")
        print(f"# case {case.name} {precision}: out of memory at batch {batch}; retrying at batch {batch // 2}",
              flush=True)
        batch //= 2


def bench_case(case: Case, precision: str, impls: list[str], args, device: torch.device) -> dict:
    """Build and warm up every implementation, then time them in interleaved rounds; medians per impl."""
    runners, warm = {}, {}
    for impl in impls:
        runners[impl], warm[impl] = build_and_warm_up(impl, case, precision, args, device)
    steps = args.steps or max(1, round(args.round_seconds / max(w["last_warmup_step_s"] for w in warm.values())))
    ceilings = {}
    if getattr(args, "ceiling", False):  # each step's own matmuls replayed alone: its limit at these shapes
        for impl, runner in runners.items():
            if impl == COMPILED:  # same products as the eager model; a dispatch mode would disturb the graph
                continue
            if device.type == "cpu":
                wait_for_quiet(args.quiet_wait)
            ceilings[impl] = step_ceiling(runner.step, device)
    # Rounds A, B then B, A, ... until `rounds` of them are clean (every implementation kept
    # its threads busy for >= --min-cpu-share of the wall time, i.e. no other process took a
    # core) or `max_rounds` have run. Statistics use the clean rounds (all rounds if too few).
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    shares: dict[str, list[float]] = {impl: [] for impl in impls}
    clean: list[bool] = []
    waited = 0.0
    while sum(clean) < args.rounds and len(clean) < max(args.max_rounds, args.rounds):
        waited += wait_for_quiet(args.quiet_wait) if device.type == "cpu" else 0.0
        for impl in impls if len(clean) % 2 == 0 else impls[::-1]:
            t, share = runners[impl].timed(steps)
            times[impl].append(t)
            shares[impl].append(share)
        clean.append(device.type != "cpu" or all(shares[i][-1] >= args.min_cpu_share for i in impls))
    use = [k for k, c in enumerate(clean) if c]
    contended = len(use) < args.rounds
    if contended:
        use = list(range(len(clean)))
    train_flops = 3 * case.forward_flops()["total"]
    rows = []
    for impl in impls:
        ts = [times[impl][k] for k in use]
        t = statistics.median(ts)
        row = {
            "case": case.name,
            "precision": precision,
            "impl": impl,
            "batch": case.batch,
            "steps_per_round": steps,
            "rounds_run": len(clean),
            "rounds_clean": sum(clean),
            "rounds_used": use,
            "contended": contended,
            "waited_for_quiet_s": waited,
            "step_s_median": t,
            "step_s_all": times[impl],
            "step_s_best": min(ts),
            "spread": (max(ts) - min(ts)) / t,
            "cpu_share_all": shares[impl],
            "cpu_share": statistics.median(shares[impl]),
            "img_per_s": case.batch / t,
            "train_flops_per_step": train_flops,
            "tflops": train_flops / t / 1e12,
            "params": runners[impl].n_params,
            **warm[impl],
        }
        if impl in ceilings:  # the matmul-only time as a share of the step: 100% = nothing but matmuls
            row.update(ceilings[impl], of_ceiling=ceilings[impl]["gemm_seconds"] / t)
        if "hf" in times:
            row["vs_hf"] = statistics.median(times["hf"][k] / times[impl][k] for k in use)
        rows.append(row)
    del runners
    return {"rows": rows}


def wait_for_quiet(max_wait_s: float, busy_cores: float = 0.3, probe_s: float = 0.5) -> float:
    """Wait (at most max_wait_s) until other processes use < busy_cores cores; return seconds waited.

    Reads /proc/stat twice; this process is idle meanwhile, so any busy time is someone else's.
    """

    def busy_total() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals) - idle, sum(vals)

    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < max_wait_s:
            b0, s0 = busy_total()
            time.sleep(probe_s)
            b1, s1 = busy_total()
            if (b1 - b0) / max(s1 - s0, 1) * (os.cpu_count() or 1) < busy_cores:
                break
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter() - t0


def read_status_kb(field: str) -> int:
    """A field such as VmRSS or VmHWM of /proc/self/status, in kB (-1 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1
