"""The benchmark's analytic FLOP count agrees with torch's FlopCounterMode (fastmae.bench, benchmarks/bench_model.py)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_model import CASES, selfcheck
from fastmae.bench import cases as bc
from fastmae.bench import timing as bt
from fastmae.bench.flops import mae_forward_flops, mae_train_flops, vit_forward_flops


def test_flops_match_flop_counter_on_tiny_mae_and_vit():
    selfcheck(impls=("fastmae",), verbose=False)  # pretrain and finetune; raises on a mismatch; --selfcheck adds HF


def test_flops_scale_with_batch_and_training_is_three_forwards():
    kw = CASES["A"].flop_kwargs()
    one = mae_forward_flops(**kw)
    assert mae_forward_flops(**kw, batch=16)["total"] == 16 * one["total"]
    assert mae_train_flops(**kw) == 3 * one["total"]
    # ViT-B/16 MAE at 75% masking: 12 blocks on 50 visible tokens cost less than 8 decoder blocks on 197
    assert round(one["encoder"] / 1e9, 2) == 8.59 and round(one["decoder"] / 1e9, 2) == 10.55
    # CrossMAE's decoder on 49 of the 196 patches (kept 0.25): 8 blocks of 49 queries on the 50 encoder tokens
    cross = mae_forward_flops(**kw, decoder="cross", kept_mask_ratio=0.25)
    assert cross["encoder"] == one["encoder"] and round(one["decoder"] / cross["decoder"], 1) == 4.2


def test_finetune_flops_cover_all_tokens():
    ft = CASES["AF"].forward_flops()
    assert ft == vit_forward_flops(**CASES["AF"].flop_kwargs(), batch=16)
    # ViT-B/16 on all 197 tokens: 35.1 GFLOP (17.6 G multiply-adds) per image forward, the usual figure,
    # and about 4x the MAE encoder on its 50 visible tokens
    assert round(ft["total"] / 16 / 1e9, 1) == 35.1
    assert 4 < ft["encoder"] / 16 / mae_forward_flops(**CASES["A"].flop_kwargs())["encoder"] < 4.2


@pytest.mark.parametrize("name,decoder", [("B", "self"), ("L", "self"), ("A", "cross")])
def test_gpu_pretrain_cases_match_flop_counter_on_meta(name, decoder):
    """The GPU cases' analytic count equals FlopCounterMode on the real model, built on the meta device (no compute);
    a cross decoder's too (M = 0.25 L queries on the 1+K encoder tokens)."""
    case = dataclasses.replace(CASES[name], batch=2, decoder=decoder, kept_mask_ratio=0.25 if decoder == "cross" else 0)
    with torch.device("meta"):
        model = bc.build_fastmae(case).train()
        imgs = torch.empty(2, 3, case.img_size, case.img_size)  # (B, C, H, W)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        bc.loss_fn("fastmae", model, case)(imgs)
    assert fc.get_total_flops() == case.forward_flops()["total"]


def test_gpu_finetune_cases_are_vit_b_and_vit_l():
    per_image = {n: CASES[n].forward_flops()["total"] / CASES[n].batch for n in ("AF", "BF", "LF")}
    assert per_image["BF"] == per_image["AF"]  # the same ViT-B/16, a bigger batch
    assert round(per_image["LF"] / 2e9, 1) == 61.6  # ViT-L/16 at 224 px: the usual 61.6 G multiply-adds


def test_out_of_memory_halves_the_batch(monkeypatch):
    """bench_case_fitting retries a case at half the batch after torch.OutOfMemoryError, and says which ran."""
    tried = []

    def fake_bench_case(case, precision, impls, args, device):
        tried.append(case.batch)
        if case.batch > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"rows": [{"case": case.name, "batch": case.batch}]}

    monkeypatch.setattr(bt, "bench_case", fake_bench_case)
    res = bt.bench_case_fitting(CASES["B"], "bf16", ["fastmae"], argparse.Namespace(), torch.device("cpu"))
    assert tried == [256, 128, 64]
    assert res["rows"] == [{"case": "B", "batch": 64, "batch_requested": 256}]
    with pytest.raises(RuntimeError, match="out of memory even at batch 128"):  # 64 would be under min_batch
        bt.bench_case_fitting(CASES["B"], "bf16", ["fastmae"], argparse.Namespace(), torch.device("cpu"),
                              min_batch=128)
