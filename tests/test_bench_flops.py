"""The benchmark's analytic FLOP count agrees with torch's FlopCounterMode (benchmarks/bench_model.py)."""

from __future__ import annotations

from benchmarks.bench_model import CASES, mae_forward_flops, mae_train_flops, selfcheck, vit_forward_flops


def test_flops_match_flop_counter_on_tiny_mae_and_vit():
    selfcheck(impls=("fastmae",), verbose=False)  # pretrain and finetune; raises on a mismatch; --selfcheck adds HF


def test_flops_scale_with_batch_and_training_is_three_forwards():
    kw = CASES["A"].flop_kwargs()
    one = mae_forward_flops(**kw)
    assert mae_forward_flops(**kw, batch=16)["total"] == 16 * one["total"]
    assert mae_train_flops(**kw) == 3 * one["total"]
    # ViT-B/16 MAE at 75% masking: 12 blocks on 50 visible tokens cost less than 8 decoder blocks on 197
    assert round(one["encoder"] / 1e9, 2) == 8.59 and round(one["decoder"] / 1e9, 2) == 10.55


def test_finetune_flops_cover_all_tokens():
    ft = CASES["AF"].forward_flops()
    assert ft == vit_forward_flops(**CASES["AF"].flop_kwargs(), batch=16)
    # ViT-B/16 on all 197 tokens: 35.1 GFLOP (17.6 G multiply-adds) per image forward, the usual figure,
    # and about 4x the MAE encoder on its 50 visible tokens
    assert round(ft["total"] / 16 / 1e9, 1) == 35.1
    assert 4 < ft["encoder"] / 16 / mae_forward_flops(**CASES["A"].flop_kwargs())["encoder"] < 4.2
