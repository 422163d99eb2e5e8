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

from fastmae.checkpoint import find_latest, load_checkpoint, save_checkpoint

from .test_cli_pretrain import make_fmnist, tiny_args

REPO = Path(__file__).resolve().parents[1]


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
from fastmae.checkpoint import save_checkpoint
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
