"""Faults and untrusted files: SIGKILL while saving, a failing DDP rank, torch.load only with weights_only."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmae.weights.checkpoint import find_latest, load_checkpoint, save_checkpoint
from tests.helpers.cli import make_fmnist, tiny_args

REPO = Path(__file__).resolve().parents[2]


def test_every_torch_load_uses_weights_only():
    """No torch.load anywhere in the package, benchmarks or examples without weights_only=True."""
    offenders = []
    for folder in ("fastmae", "benchmarks", "examples"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix not in (".py", ".ipynb"):
                continue
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                call = text[m.start(): text.find(")", m.end()) + 1]
                if "weights_only=True" not in call:
                    offenders.append(f"{path.relative_to(REPO)}: {call}")
    assert not offenders, offenders


WRITER = """
import sys, torch
from fastmae.weights.checkpoint import save_checkpoint
state = {"model": {"w": torch.randn(64, 1024, 1024)}, "optimizer": {}, "epoch": 2, "batch": 0, "step": 2, "rng": {}}
print("writing", flush=True)
save_checkpoint(sys.argv[1], state, {"kind": "test"})
"""


def test_sigkill_while_saving_keeps_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, {"model": {"w": torch.ones(3)}, "optimizer": {}, "epoch": 1, "batch": 0, "step": 1,
                               "rng": {}}, {"kind": "test"})
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".checkpoint-00000002.pt.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-write: the temp file exists, the rename has not happened
    proc.wait()
    assert not (tmp_path / "checkpoint-00000002.pt").exists()
    assert find_latest(tmp_path).name == "checkpoint-00000001.pt"
    state, meta = load_checkpoint(tmp_path)
    assert torch.equal(state["model"]["w"], torch.ones(3)) and meta["kind"] == "test"
    # the next save cleans the stale temp file the killed writer left behind
    save_checkpoint(tmp_path, {"model": {}, "optimizer": {}, "epoch": 3, "batch": 0, "step": 3, "rng": {}}, {})
    assert not list(tmp_path.glob(".checkpoint-*.tmp"))


@pytest.mark.slow
def test_failing_rank_ends_the_ddp_job_with_its_error(tmp_path):
    data = make_fmnist(tmp_path, 64, 16)
    args = tiny_args(data, tmp_path / "run", epochs=2) + ["--run.num_threads", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "helpers" / "ddp_fault_worker.py"), *args]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert res.returncode != 0
    assert "injected fault on rank 1" in res.stdout + res.stderr
    assert time.time() - t0 < 200  # ended, not hung until the collective timeout
    assert not list((tmp_path / "run").glob("checkpoint-*.pt"))


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_a_checkpoint(tmp_path):
    """`kill -TERM -- -PGID` (torchrun, Slurm) reaches the DataLoader workers too: they must leave the signal to
    the main process, which saves mid-epoch and exits cleanly; the same command then resumes."""
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(64):
        a = torch.randint(0, 255, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(a).save(imgs / f"{i:03d}.png")
    args = tiny_args(imgs, tmp_path / "run", epochs=500)[1:] + [
        "--data.source", "unlabelled", "--data.num_workers", "2", "--model.img_size", "16", "16",
        "--knn_every", "-1", "--figure_every", "0", "--optim.batch_size", "8", "--run.save_every", "1000",
        "--run.num_threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastmae", "pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    seen = []
    for line in proc.stdout:  # training has started once the first epoch line is printed
        seen.append(line)
        if line.startswith("epoch ") and " done: " in line:
            break
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its worker processes alike
    out, _ = proc.communicate(timeout=120)
    text = "".join(seen) + out
    assert proc.returncode == 0, text
    assert "signal 15: saved" in text and "killed by signal" not in text, text
    ckpt = find_latest(tmp_path / "run")
    state, _ = load_checkpoint(ckpt)
    assert state["batch"] > 0 or state["epoch"] > 0
