"""End-to-end `fastmae pretrain` on tiny data the test makes: outputs, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastmae.cli import main
from fastmae.commands.pretrain import run_pretrain
from fastmae.weights.checkpoint import list_checkpoints, load_checkpoint
from tests.helpers.cli import make_fmnist, tiny_args, tiny_cfg


@pytest.fixture()
def fmnist(tmp_path):
    return make_fmnist(tmp_path)



def test_pretrain_end_to_end_outputs(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(fmnist, out)) == 0
    printed = capsys.readouterr().out
    assert "checkpoint" in printed and "reconstruction.png" in printed and "kNN top-1" in printed
    first, second = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert first.startswith("epoch 1/2 done: loss ") and "knn_top1 " in first and " left" in first
    assert second.startswith("epoch 2/2 done: ") and " left" not in second  # the run is over
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optim"]["epochs"] == 2 and cfg["model"]["embed_dim"] == 32
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if "epoch" in e and "loss" in e]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(np.isfinite(e["loss"]) for e in epochs)
    assert "knn_top1" in epochs[-1] and epochs[-1]["knn_pool"] == "tokens"  # the monitor's keys, prefixed
    assert (out / "reconstruction.png").stat().st_size > 0
    assert list((out / "tensorboard").iterdir())
    state, meta = load_checkpoint(out)
    assert meta["kind"] == "mae" and meta["model_kwargs"]["in_chans"] == 1 and state["epoch"] == 2
    assert set(state) >= {"model", "optimizer", "rng", "step", "epoch", "batch"}



def _final_weights(out):
    state, _ = load_checkpoint(out)
    return state["model"]



@pytest.mark.parametrize("stop_after,where", [(2, (0, 2)), (3, (1, 1))])
def test_preempted_and_resumed_run_equals_uninterrupted(fmnist, tmp_path, monkeypatch, capsys, stop_after, where):
    import fastmae.train.trainer as trainer

    full = tmp_path / "full"
    run_pretrain(tiny_cfg(fmnist, full, epochs=3))

    part = tmp_path / "part"
    calls = {"n": 0}

    def fake_stop(self):  # behave as if SIGTERM arrived after `stop_after` steps
        calls["n"] += 1
        if calls["n"] >= stop_after:
            self.signal = 15
        return self.signal is not None

    monkeypatch.setattr(trainer.StopFlag, "__call__", fake_stop)
    run_pretrain(tiny_cfg(fmnist, part, epochs=3))
    state, _ = load_checkpoint(part)
    assert (state["epoch"], state["batch"]) == where  # saved mid-epoch, where it stopped
    monkeypatch.undo()
    capsys.readouterr()
    run_pretrain(tiny_cfg(fmnist, part, epochs=3))  # the same command resumes
    said = capsys.readouterr().out
    here = f"in epoch {where[0] + 1} after batch {where[1]}"  # epochs counted from 1, as in the epoch lines
    assert f" {here}\n" in said and f"(since resuming {here}):" in said, said
    a, b = _final_weights(full), _final_weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the epoch that was cut in two reports the loss of the whole epoch, not of its resumed part
    losses = [[e["loss"] for e in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in e]
              for d in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 3



def test_resume_with_fewer_batches_per_epoch(fmnist, tmp_path, monkeypatch, capsys):
    """At an epoch's end the data may change (here 3 -> 2 batches per epoch: the new steps number lower, and the
    new checkpoints still count as the newest); mid-epoch it may not (the batch position would mean nothing)."""
    import fastmae.train.trainer as trainer

    out = tmp_path / "run"
    knobs = ["--knn_every", "-1", "--figure_every", "0"]
    assert main(tiny_args(fmnist, out, epochs=2) + knobs) == 0  # steps 3, 6
    assert main(tiny_args(fmnist, out, epochs=3) + knobs + ["--data.limit", "64"]) == 0  # epoch 3: step 6 again
    state, _ = load_checkpoint(out)
    assert (state["epoch"], state["step"], state["steps_per_epoch"]) == (3, 6, 2)
    assert [load_checkpoint(p)[0]["epoch"] for p in list_checkpoints(out)] == [2, 3]  # keep_last 2, by progress

    calls = {"n": 0}

    def fake_stop(self):  # SIGTERM after the first batch of epoch 4
        calls["n"] += 1
        if calls["n"] >= 1:
            self.signal = 15
        return self.signal is not None

    monkeypatch.setattr(trainer.StopFlag, "__call__", fake_stop)
    assert main(tiny_args(fmnist, out, epochs=4) + knobs + ["--data.limit", "64"]) == 0
    monkeypatch.undo()
    assert (load_checkpoint(out)[0]["epoch"], load_checkpoint(out)[0]["batch"]) == (3, 1)
    capsys.readouterr()
    assert main(tiny_args(fmnist, out, epochs=4) + knobs) == 2  # 3 batches per epoch again, mid-epoch
    assert "stopped at batch 1 of 2 in epoch 4, but this run has 3 batches per epoch" in capsys.readouterr().err



def test_resume_refuses_other_architecture(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(fmnist, out, epochs=1)) == 0
    args = tiny_args(fmnist, out, epochs=2)
    args[args.index("--model.depth") + 1] = "3"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit this run's model" in err and "blocks.2" in err



def test_non_finite_loss_stops_and_keeps_last_checkpoint(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(fmnist, out, epochs=1)) == 0
    before = list_checkpoints(out)
    args = tiny_args(fmnist, out, epochs=3) + ["--optim.lr", "1e30"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step" in err
    assert list_checkpoints(out) == before
    assert torch.isfinite(torch.cat([v.flatten().float() for v in _final_weights(out).values()])).all()



def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, capsys):
    assert main(tiny_args(tmp_path / "nowhere", tmp_path / "run")) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err



def test_help_lists_sections(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "--data.path" in out and "--optim.blr" in out and "--model.mask_ratio" in out

