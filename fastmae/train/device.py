"""Where a job computes and in which number format: device, precision by capability, autocast, scaler.

Every command resolves `--run.device` and `--run.precision` here, so the rule is written once:
`auto` is bf16 autocast on CUDA where supported (else fp16 + a gradient scaler), and on a CPU only
where the CPU computes bf16 natively (AVX512_BF16 or AMX, oneDNN's own check); elsewhere fp32,
because emulated bf16 matmuls run 20-100x slower than fp32 ones (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_device(name: str, flag: str = "--run.device") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error naming the flag."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} cuda was asked for but no CUDA device is available; use {flag} cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"{flag} must be one of auto, cpu, cuda; got {name!r}")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls in hardware: x86 AVX512_BF16 or AMX, or an Arm CPU with bf16.

    oneDNN's `_is_mkldnn_bf16_supported` alone also says yes for plain AVX-512 (emulated through fp32),
    so on x86 the instruction sets are asked directly.
    """
    cpu = getattr(torch, "cpu", None)
    x86 = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        if all(callable(f) for f in x86) and callable(getattr(cpu, "_is_avx2_supported", None)) \
                and cpu._is_avx2_supported():
            return bool(x86[0]() or x86[1]())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """The resolved number format and, when `auto` fell back, why (for the startup line)."""

    name: str  # 'bf16', 'fp16' or 'fp32'
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason else self.name


def resolve_precision(precision: str, device: torch.device, flag: str = "--run.precision") -> Precision:
    """'auto' -> bf16 / fp16 on CUDA by support, bf16 on a CPU with native bf16, else fp32 (with the reason).

    An explicit bf16 on a CPU without native bf16 works but warns once; fp16 needs CUDA.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{flag} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return Precision("bf16") if torch.cuda.is_bf16_supported() else Precision("fp16", "no bf16 on this GPU")
        if cpu_has_native_bf16():
            return Precision("bf16")
        return Precision("fp32", "no native bf16 on this CPU")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"{flag} fp16 needs a CUDA device (it uses a gradient scaler); use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warn_emulated_bf16()
    return Precision(precision)


@functools.cache
def warn_emulated_bf16() -> None:
    """Say once per process that bf16 on this CPU is emulated."""
    warnings.warn(
        "this CPU has no native bf16 (no AVX512_BF16 or AMX): bf16 is emulated and runs many times slower than "
        "fp32; use --run.precision fp32 (or auto)", RuntimeWarning, stacklevel=3,
    )


def autocast(device: torch.device, precision: str):
    """The autocast context for a precision name ('fp32' -> no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 on CUDA, None otherwise."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
