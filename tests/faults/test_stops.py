"""Stop signals save and resume bit-exactly wherever they arrive: inside a gradient-accumulation group, with an image
folder, during an epoch-end evaluation, after training (final evaluation), during a write; and a damaged newest
checkpoint names the one to resume from."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import torch
import tyro
from PIL import Image

from fastmae.cli import main
from fastmae.commands.pretrain import PretrainConfig, run_pretrain
from fastmae.train import trainer
from fastmae.train.signals import Stopped, raising
from fastmae.weights.checkpoint import atomic_write, list_checkpoints, load_checkpoint
from tests.helpers.cli import make_fmnist, tiny_args

QUIET = ["--knn_every", "-1", "--figure_every", "0"]


def cfg_of(args: list[str]) -> PretrainConfig:
    return tyro.cli(PretrainConfig, args=args[1:], use_underscores=True)


def stop_at_call(monkeypatch, n: int) -> None:
    """The stop flag reads as set from its n-th poll on (as if SIGTERM arrived after the n-th batch)."""
    calls = {"n": 0}

    def fake_stop(self):
        calls["n"] += 1
        if calls["n"] >= n:
            self.signal = 15
        return self.signal is not None

    monkeypatch.setattr(trainer.StopFlag, "__call__", fake_stop)


def assert_same_weights(a, b) -> None:
    wa, wb = load_checkpoint(a)[0]["model"], load_checkpoint(b)[0]["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_stop_inside_an_accumulation_group_resumes_bit_exactly(tmp_path, monkeypatch):
    data = make_fmnist(tmp_path)  # 3 batches per epoch, 2 per optimizer step
    args = lambda out: tiny_args(data, out, epochs=2) + QUIET + ["--optim.accum_iter", "2"]  # noqa: E731
    run_pretrain(cfg_of(args(tmp_path / "full")))
    stop_at_call(monkeypatch, 1)  # asked to stop after batch 1: the group ends with batch 2's update first
    run_pretrain(cfg_of(args(tmp_path / "part")))
    state, _ = load_checkpoint(tmp_path / "part")
    assert (state["epoch"], state["batch"]) == (0, 2)
    monkeypatch.undo()
    run_pretrain(cfg_of(args(tmp_path / "part")))
    assert_same_weights(tmp_path / "full", tmp_path / "part")
    losses = [[e["loss"] for e in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines()) if "loss" in e]
              for d in ("full", "part")]
    assert losses[0] == losses[1]


def test_image_folder_run_resumed_mid_epoch_equals_uninterrupted(tmp_path, monkeypatch):
    """iter(DataLoader) must not draw from the global RNG (masks and drop-path use it): the resumed epoch would
    draw once more than the uninterrupted run did."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(images / f"{i:02d}.png")

    def args(out):
        a = tiny_args(images, out, epochs=2) + QUIET
        return a + ["--data.source", "unlabelled", "--data.channels", "1", "--data.num_workers", "0",
                    "--model.img_size", "16", "16", "--optim.batch_size", "8"]

    run_pretrain(cfg_of(args(tmp_path / "full")))
    stop_at_call(monkeypatch, 4)  # epoch 2, after its second batch (two polls per 3-batch epoch)
    run_pretrain(cfg_of(args(tmp_path / "part")))
    assert (load_checkpoint(tmp_path / "part")[0]["epoch"], load_checkpoint(tmp_path / "part")[0]["batch"]) == (1, 2)
    monkeypatch.undo()
    run_pretrain(cfg_of(args(tmp_path / "part")))
    assert_same_weights(tmp_path / "full", tmp_path / "part")


def test_a_stop_during_the_epoch_end_knn_does_not_wait_for_it(tmp_path, monkeypatch, capsys):
    import fastmae.commands.pretrain as pretrain

    data = make_fmnist(tmp_path)
    out = tmp_path / "run"
    finished = []

    def slow_knn(self, model):  # SIGTERM arrives while a long evaluation runs
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
        finished.append(True)
        return {}

    monkeypatch.setattr(pretrain.Monitor, "knn", slow_knn)
    t0 = time.monotonic()
    assert main(tiny_args(data, out, epochs=3) + ["--figure_every", "0"]) == 0
    assert time.monotonic() - t0 < 30 and not finished
    state, _ = load_checkpoint(out)
    assert (state["epoch"], state["batch"]) == (1, 0)  # the epoch's end, saved at once
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-2]["epoch"] == 1 and log[-2]["epoch_end_skipped"] == "signal 15" and log[-1]["event"] == "preempted"
    assert "signal 15: saved" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(tiny_args(data, out, epochs=3) + QUIET) == 0  # resumes at epoch 2
    assert load_checkpoint(out)[0]["epoch"] == 3


def test_a_stop_during_a_final_evaluation_is_one_line_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    import fastmae.commands.segment as segment

    data = make_fmnist(tmp_path)
    args = ["segment", "--init", "random", "--data.path", str(data), "--run.output_dir", str(tmp_path / "seg"),
            "--seg.train_scenes", "8", "--seg.eval_scenes", "4", "--seg.scene_size", "32", "--model.name", "vit_tiny_patch8",
            "--model.embed_dim", "16", "--model.depth", "1", "--model.num_heads", "2", "--optim.epochs", "1",
            "--optim.batch_size", "4", "--run.no_progress", "--seg.figure_rows", "1"]
    real = segment.SegEvaluator.evaluate

    def stopped_scoring(*a, **k):
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning signal, after training
        time.sleep(5)
        raise AssertionError("the signal should have ended the evaluation")

    monkeypatch.setattr(segment.SegEvaluator, "evaluate", stopped_scoring)
    assert main(args) == 128 + signal.SIGUSR1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastmae: stopped by signal 10 before the command finished")
    assert list_checkpoints(tmp_path / "seg") and not (tmp_path / "seg" / "segment.json").exists()
    monkeypatch.setattr(segment.SegEvaluator, "evaluate", real)
    assert main(args) == 0 and (tmp_path / "seg" / "segment.json").exists()


def test_a_stop_during_a_write_leaves_no_temp_file(tmp_path):
    def write(tmp):
        tmp.write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    with pytest.raises(Stopped), raising():
        atomic_write(tmp_path / "model.safetensors", write)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_newest_checkpoint_names_the_one_before_it(tmp_path, capsys):
    data = make_fmnist(tmp_path)
    out = tmp_path / "run"
    assert main(tiny_args(data, out, epochs=2) + QUIET) == 0
    older, newest = list_checkpoints(out)
    newest.write_bytes(newest.read_bytes()[:3000])  # a copy cut short
    assert main(tiny_args(data, out, epochs=3) + QUIET) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{newest} is not a readable PyTorch checkpoint" in err
    assert f"resume from the checkpoint before it ({older})" in err and f"mv {newest} {newest}.damaged" in err


def test_a_garbage_checkpoint_sidecar_names_its_file(tmp_path):
    data = make_fmnist(tmp_path)
    out = tmp_path / "run"
    assert main(tiny_args(data, out, epochs=1) + QUIET) == 0
    (ckpt,) = list_checkpoints(out)
    ckpt.with_suffix(".json").write_text("{garbage")
    with pytest.raises(ValueError, match=rf"{ckpt.with_suffix('.json')}, the metadata of checkpoint .* is not valid "
                                         r"JSON \(Expecting property name"):
        load_checkpoint(ckpt)


def test_a_stop_inside_an_import_is_the_stop_line(monkeypatch, capsys):
    """A signal while a C extension initialises (seen: SIGTERM during `import matplotlib` after training) reaches
    the command as 'ImportError: initialization failed' caused by Stopped: still the one stop line and 128 + N."""
    from fastmae import cli

    def run(cfg):
        try:
            raise Stopped(15)
        except Stopped as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(cli, "parse", lambda argv: cli.COMMANDS["knn"][0](init="random"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: type("M", (), {"run_knn": staticmethod(run)}))
    assert cli.main(["knn"]) == 143
    err = capsys.readouterr().err
    assert err.startswith("fastmae: stopped by signal 15") and err.count("\n") == 1


def test_a_stop_during_the_last_epochs_knn_names_the_epoch_of_the_knn_it_reports(tmp_path, monkeypatch, capsys):
    """The last epoch's kNN cut short by SIGTERM: the run is done, and its closing line says its kNN top-1 is from
    an earlier epoch (it printed that number as if it were the final one)."""
    import fastmae.commands.pretrain as pretrain

    data = make_fmnist(tmp_path)
    real, calls = pretrain.Monitor.knn, []

    def knn_then_stop(self, model):
        calls.append(1)
        if len(calls) == 2:  # in the second (last) epoch's kNN
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return real(self, model)

    monkeypatch.setattr(pretrain.Monitor, "knn", knn_then_stop)
    assert main(tiny_args(data, tmp_path / "run", epochs=2) + ["--figure_every", "0"]) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "after epoch 1: the last epoch's was interrupted" in out
