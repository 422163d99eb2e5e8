"""The machine a number came from and the markdown table of a timing run."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

from .cases import hf_available


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "cpus": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, gpu_sms=props.multi_processor_count,
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    if hf_available():
        import transformers

        info["transformers"] = transformers.__version__
    return info


def markdown_table(rows: list[dict], peaks: dict[str, float]) -> str:
    """Medians over the clean rounds; 'best' is the fastest of them; 'clean' = clean rounds / rounds run.

    With the ceiling measured (`fastmae bench`, bench_model --ceiling): the step's own matmuls replayed alone, and
    that time as a share of the step (100% = nothing but matmuls). GPU rows add the batch that ran (it may have been
    halved after running out of memory) and the implementation's peak allocated memory.
    """
    gpu = any("peak_mem_gib" in r for r in rows)
    ceiling = any("of_ceiling" in r for r in rows)
    head = "| case | precision | impl | img/s | step ms | best ms | spread | clean | TFLOP/s | % of peak | vs HF |"
    align = "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if ceiling:
        head, align = head + " matmul-only ms | % of own matmul limit |", align + " ---: | ---: |"
    if gpu:
        head, align = head + " batch | peak GiB |", align + " ---: | ---: |"
    lines = [head, align]
    for r in rows:
        vs = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-"
        line = (
            f"| {r['case']} | {r['precision']} | {r['impl']} | {r['img_per_s']:.1f} | {1e3 * r['step_s_median']:.0f} "
            f"| {1e3 * r['step_s_best']:.0f} | {100 * r['spread']:.0f}% "
            f"| {r['rounds_clean']}/{r['rounds_run']}{' (!)' if r['contended'] else ''} | {r['tflops']:.3f} "
            f"| {100 * r['tflops'] / peaks[r['precision']]:.0f}% | {vs} |"
        )
        if ceiling:
            line += (f" {1e3 * r['gemm_seconds']:.0f} | {100 * r['of_ceiling']:.0f}% |" if "of_ceiling" in r
                     else " - | - |")
        if gpu:
            line += f" {r['batch']} | {r.get('peak_mem_gib', float('nan')):.1f} |"
        lines.append(line)
    return "\n".join(lines)


def add_peak_shares(rows: list[dict], peaks: dict[str, float]) -> None:
    """Each row's achieved TFLOP/s as a share of the measured matmul peak of its precision ('mfu')."""
    for r in rows:
        r["mfu"] = r["tflops"] / peaks[r["precision"]]
