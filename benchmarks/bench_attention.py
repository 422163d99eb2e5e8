"""fp32 attention on CPU: F.scaled_dot_product_attention against explicit matmul attention, forward + backward.

The shapes are the encoder and decoder attention calls of cases F and C (benchmarks/bench_model.py) at batch 256:
(B, heads, tokens, head dim). One thread; per shape the median of 20 calls, the middle of 3 repeats.

    python benchmarks/bench_attention.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = {"F encoder": (256, 3, 13, 64), "F decoder": (256, 4, 50, 32), "C encoder": (256, 3, 17, 64),
          "C decoder": (256, 4, 65, 32)}


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with two matmuls (what fastmae.models.vit.attention does for short bf16 sequences)."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def call_ms(fn, shape: tuple[int, ...], calls: int = 20) -> float:
    """Median ms of one forward + backward of `fn` at `shape`, after 3 warm-up calls."""
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape)
    for _ in range(3):
        fn(q, k, v).backward(grad)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(q, k, v).backward(grad)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    print("| call | shape | SDPA ms | matmul ms | SDPA / matmul |\n| --- | --- | ---: | ---: | ---: |")
    for name, shape in SHAPES.items():
        runs = [(call_ms(F.scaled_dot_product_attention, shape), call_ms(matmul_attention, shape)) for _ in range(3)]
        sdpa, mm = sorted(r[0] for r in runs)[1], sorted(r[1] for r in runs)[1]
        print(f"| {name} | {shape} | {sdpa:.2f} | {mm:.2f} | {sdpa / mm:.2f}x |")


if __name__ == "__main__":
    main()
