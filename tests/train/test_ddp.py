"""torchrun: 2-process gloo DDP matches a 1-process run of the same global batch; a 1-process torchrun joins a group."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist

from fastmae.train.dist import cleanup, init_distributed
from tests.conftest import set_torchrun_env
from tests.helpers.cli import make_fmnist, tiny_args


def _epoch_losses(out) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    data = make_fmnist(tmp_path, 128, 32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(nproc: int, batch: int, out):
        args = tiny_args(data, out, epochs=2)
        args[args.index("--optim.batch_size") + 1] = str(batch)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastmae", *args, "--run.num_threads", "1"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    two = run(2, 16, tmp_path / "two")  # global batch 32
    run(1, 32, tmp_path / "one")
    assert "x2" in two.stdout  # the run knew it had two processes
    l2, l1 = _epoch_losses(tmp_path / "two"), _epoch_losses(tmp_path / "one")
    assert len(l2) == len(l1) == 2
    # Same init and global batch; masks and shards differ per rank, so losses agree only statistically:
    # within 2% here (the per-epoch loss of this tiny set moves by less than 1% between seeds).
    for a, b in zip(l2, l1):
        assert abs(a - b) / b < 0.02, (l2, l1)
    # only rank 0 writes: one set of checkpoints, one log
    assert len(list((tmp_path / "two").glob("checkpoint-*.pt"))) == 2


def test_one_process_torchrun_env_joins_a_gloo_group(monkeypatch):
    """torchrun --nproc_per_node=1 joins a real (gloo) group; a plain process stays out of one."""
    for k in ("RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert not init_distributed("cpu", 60).distributed and not tdist.is_initialized()
    set_torchrun_env(monkeypatch)
    try:
        info = init_distributed("cpu", 60)
        assert tdist.is_initialized() and tdist.get_backend() == "gloo"
        assert (info.rank, info.world_size, info.distributed) == (0, 1, False)
        x = torch.arange(3.0)
        tdist.all_reduce(x)
        assert x.tolist() == [0.0, 1.0, 2.0]
    finally:
        cleanup()
    assert not tdist.is_initialized()


@pytest.mark.slow
def test_two_process_stop_on_one_rank_then_resume_equals_uninterrupted(tmp_path):
    """SIGTERM reaching rank 1 only (mid-epoch): both ranks stop after the same batch and save together; the
    resumed job (each rank restores its own RNG stream) ends bit-for-bit where the uninterrupted one does."""
    from pathlib import Path

    from fastmae.weights.checkpoint import load_checkpoint

    helper = Path(__file__).parents[1] / "helpers" / "ddp_stop_worker.py"
    data = make_fmnist(tmp_path, 96, 16)  # 96 images / (2 ranks x 16) = 3 steps per epoch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(helper.parents[2])}

    def run(out, *, stop_after: int = 0):
        args = tiny_args(data, out, epochs=2) + ["--run.num_threads", "1", "--knn_every", "-1", "--figure_every",
                                                 "0", "--optim.batch_size", "16", "--run.dist_timeout", "60"]
        target = [str(helper)] if stop_after else ["-m", "fastmae"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target, *args]
        res = subprocess.run(cmd, env={**env, "STOP_AFTER": str(stop_after)}, capture_output=True, text=True,
                             timeout=180)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    run(tmp_path / "full")
    stopped = run(tmp_path / "part", stop_after=2)
    assert "a stop signal on another rank: saved" in stopped.stdout  # rank 0 saw no signal itself
    state, _ = load_checkpoint(tmp_path / "part")
    assert (state["epoch"], state["batch"]) == (0, 2) and len(state["rank_states"]) == 2
    assert not torch.equal(state["rank_states"][0]["rng"]["torch"], state["rank_states"][1]["rng"]["torch"])
    run(tmp_path / "part")  # the same command resumes
    a, b = load_checkpoint(tmp_path / "full")[0]["model"], load_checkpoint(tmp_path / "part")[0]["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _epoch_losses(tmp_path / "full") == _epoch_losses(tmp_path / "part")
