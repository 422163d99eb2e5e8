"""The matmul ceiling of a train step at its own shapes: the step's matrix products replayed alone.

The square-matmul peak (timing.matmul_peak_tflops) is what the hardware reaches on one large 2048^3 product; a
ViT-Ti step multiplies (B*N, 192) by (192, 576) and smaller, which may run below that peak. Recording every
mm/addmm/bmm of one real step (forward and backward, through a dispatch mode) and timing those products alone, with
nothing else in between, gives the fastest the step could be if everything that is not a matmul were free: the
limit the rest of the step is measured against. Products inside fused kernels (CPU flash attention) and
convolutions are not recorded, so the limit is slightly optimistic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .cases import median_seconds

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _RecordGemms(TorchDispatchMode):
    """Counts (op, operand shapes, dtype, operand strides) of every matmul dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            shapes = tuple(tuple(a.shape) for a in tensors)
            strides = tuple(tuple(a.stride()) for a in tensors)  # a weight gradient's x.t() is a transposed view
            self.calls[(func, shapes, tensors[0].dtype, strides)] += 1
        return func(*args, **(kwargs or {}))


def record_gemms(step: Callable[[], object]) -> Counter:
    """{(op, shapes, dtype): calls} of one call of `step` (a full train step: forward, backward, optimizer)."""
    with _RecordGemms() as rec:
        step()
    return rec.calls


def gemm_flops(calls: Counter) -> float:
    """2 x multiply-adds of the recorded products (mm/addmm: m*k*n; bmm: b*m*k*n)."""
    total = 0.0
    for (func, shapes, *_), n in calls.items():
        a, b = shapes[-2], shapes[-1]  # addmm's bias comes first
        batch = a[0] if func is torch.ops.aten.bmm.default else 1
        total += n * 2.0 * batch * a[-2] * a[-1] * b[-1]
    return total


def replay_seconds(calls: Counter, device: torch.device, reps: int = 5) -> float:
    """Median seconds to run every recorded product once (each as often as the step ran it), on random operands of
    the step's shapes and memory layouts (a transposed view stays transposed: BLAS and oneDNN take other paths for
    it): the step's matmul time with nothing else in between."""
    ops = []
    g = torch.Generator(device).manual_seed(0)
    for (func, shapes, dtype, strides), n in calls.items():
        args = [_random_strided(s, st, dtype, device, g) for s, st in zip(shapes, strides)]
        ops.append((func, args, n))

    def once() -> None:
        for func, args, n in ops:
            for _ in range(n):
                func(*args)

    once()  # warm-up: kernels chosen, caches filled
    return median_seconds(once, device, reps)


def _random_strided(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    g: torch.Generator) -> torch.Tensor:
    """A random tensor of this shape laid out with these strides (a view of a large enough random buffer)."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride) if n > 0)
    base = torch.randn(size, generator=g, device=device).to(dtype)
    return base.as_strided(shape, stride)


def step_ceiling(step: Callable[[], object], device: torch.device, reps: int = 5) -> dict:
    """{'gemm_flops', 'gemm_seconds', 'gemm_tflops'}: the step's own matmuls, recorded once and replayed alone."""
    calls = record_gemms(step)
    flops = gemm_flops(calls)
    seconds = replay_seconds(calls, device, reps)
    return {"gemm_flops": flops, "gemm_seconds": seconds, "gemm_tflops": flops / seconds / 1e12,
            "gemm_calls": sum(calls.values())}
