"""The matmul ceiling of a step (fastmae.bench.ceiling): every product of forward and backward recorded, counted."""

from __future__ import annotations

import torch

from fastmae.bench.ceiling import gemm_flops, record_gemms, step_ceiling


def test_records_forward_and_backward_products_of_a_linear_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    x = torch.randn(6, 8, requires_grad=True)

    def step():
        lin(x).sum().backward()

    calls = record_gemms(step)
    # forward addmm (6x8 @ 8x5), backward: grad_input (6x5 @ 5x8) and grad_weight (5x6 @ 6x8)
    assert sum(calls.values()) == 3
    assert gemm_flops(calls) == 3 * 2 * 6 * 8 * 5


def test_bmm_counts_its_batch_and_the_ceiling_is_positive():
    a, b = torch.randn(4, 3, 7), torch.randn(4, 7, 2)
    calls = record_gemms(lambda: torch.bmm(a, b))
    assert gemm_flops(calls) == 2 * 4 * 3 * 7 * 2
    res = step_ceiling(lambda: torch.bmm(a, b), torch.device("cpu"), reps=2)
    assert res["gemm_calls"] == 1 and res["gemm_seconds"] > 0 and res["gemm_tflops"] > 0


def test_replay_keeps_each_operand_layout(monkeypatch):
    """A weight gradient multiplies a transposed view (x.t()); BLAS takes another path for it, so the replay must
    lay its random operands out with the recorded strides, not contiguously (a contiguous replay timed the
    fine-tune step's matmuls at 3-4x the whole step on an AVX2 CPU)."""
    x, w = torch.randn(6, 8), torch.randn(6, 5)
    calls = record_gemms(lambda: torch.mm(x.t(), w))
    ((func, shapes, dtype, strides),) = calls
    assert shapes == ((8, 6), (6, 5)) and strides == ((1, 8), (5, 1))
    from fastmae.bench import ceiling

    seen = []
    real = ceiling._random_strided
    monkeypatch.setattr(ceiling, "_random_strided", lambda *a: seen.append(real(*a)) or seen[-1])
    ceiling.replay_seconds(calls, torch.device("cpu"), reps=1)
    assert [t.stride() for t in seen] == [(1, 8), (5, 1)] and [t.shape for t in seen] == [(8, 6), (6, 5)]
