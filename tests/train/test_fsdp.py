"""--run.parallel fsdp (FSDP2 on 2 gloo processes): the same losses and weights as the same seeded DDP run, a stop
mid-epoch resumed bit-exactly from the sharded checkpoint (DCP), the run read whole by fastmae.load and convert and
resumed in one process; activation checkpointing leaves the step's numbers unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae.cli import main
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.weights.checkpoint import load_checkpoint
from tests.helpers.cli import make_fmnist, tiny_args

HELPER = Path(__file__).parents[1] / "helpers" / "ddp_stop_worker.py"


def _losses(out) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


def _run(data, out, *extra, stop_after: int = 0, nproc: int = 2, epochs: int = 2, knn_every: int = -1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPER.parents[2]), "STOP_AFTER": str(stop_after)}
    args = tiny_args(data, out, epochs=epochs) + ["--run.num_threads", "1", "--knn_every", str(knn_every),
                                                  "--optim.batch_size", "16", "--run.dist_timeout", "60", *extra]
    target = [str(HELPER)] if stop_after else ["-m", "fastmae"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_exactly_and_loads_whole(tmp_path):
    data = make_fmnist(tmp_path, 96, 16)  # 96 images / (2 ranks x 16) = 3 steps per epoch
    _run(data, tmp_path / "ddp", knn_every=1)
    _run(data, tmp_path / "fsdp", "--run.parallel", "fsdp", knn_every=1)  # epoch-end figure and kNN on all ranks
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert len(ddp) == len(fsdp) == 2
    for a, b in zip(ddp, fsdp):
        assert abs(a - b) <= 1e-4 * abs(a), (ddp, fsdp)
    knn = [[e["knn_top1"] for e in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())
            if "knn_top1" in e] for d in ("ddp", "fsdp")]
    assert len(knn[0]) == 2 and knn[0] == knn[1]
    assert sorted(p.name for p in (tmp_path / "fsdp").glob("checkpoint-*.dcp")) == ["checkpoint-00000003.dcp",
                                                                                    "checkpoint-00000006.dcp"]
    whole = load_checkpoint(tmp_path / "fsdp")[0]["model"]  # the DCP shards read back as one model
    ref = load_checkpoint(tmp_path / "ddp")[0]["model"]
    assert whole.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(whole[k], ref[k], rtol=1e-4, atol=1e-6)

    # stopped mid-epoch on one rank, resumed from the sharded checkpoint: bit-exact
    _run(data, tmp_path / "part", "--run.parallel", "fsdp", stop_after=2)
    state, _ = load_checkpoint(tmp_path / "part", with_model=False)
    assert (state["epoch"], state["batch"]) == (0, 2) and state["sharded"] == "checkpoint-00000002.dcp"
    assert "model" not in state and "optimizer" not in state  # those are in the DCP folder
    _run(data, tmp_path / "part", "--run.parallel", "fsdp")
    a, b = load_checkpoint(tmp_path / "fsdp")[0]["model"], load_checkpoint(tmp_path / "part")[0]["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "fsdp") == _losses(tmp_path / "part")

    # the whole model for users: fastmae.load (strict) and convert
    import fastmae

    model = fastmae.load(str(tmp_path / "fsdp"))
    assert isinstance(model, MaskedAutoencoderViT)
    assert all(torch.equal(model.state_dict()[k], a[k]) for k in a)
    assert main(["convert", "--init", str(tmp_path / "fsdp"), "--output", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported.safetensors").exists()

    # and resumed with more epochs in one process without FSDP (DCP re-shards onto one)
    args = tiny_args(data, tmp_path / "fsdp", epochs=3) + ["--knn_every", "-1", "--optim.batch_size", "16"]
    assert main(args) == 0
    assert len(_losses(tmp_path / "fsdp")) == 3


def test_activation_checkpointing_gives_the_same_step(monkeypatch):
    """Recomputing each block in backward (drop path's RNG replayed) gives the same loss and gradients."""
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    x = torch.randn(4, 1, 16, 16)
    from fastmae.models.vit import Block

    runs = {"n": 0}
    real = Block._forward

    def counted(self, t):
        runs["n"] += 1
        return real(self, t)

    monkeypatch.setattr(Block, "_forward", counted)
    grads, counts = [], []
    for on in (False, True):
        runs["n"] = 0
        for m in model.modules():
            if hasattr(m, "checkpointing"):
                m.checkpointing = on
        model.zero_grad()
        torch.manual_seed(1)
        loss = model(x, mask_ratio=0.75)[0]
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        counts.append(runs["n"])
    assert counts == [3, 6]  # 3 blocks (2 encoder, 1 decoder), each recomputed in backward when checkpointed
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fsdp_refused_for_a_head_training_command(tmp_path, monkeypatch):
    """Commands that run their model on rank 0 only cannot shard it: one line, before training."""
    from fastmae.train.parallel import parallelize
    from fastmae.train.runtime import Runtime

    class Dist:
        distributed, world_size, rank, is_main = True, 2, 0, True

    class Run:
        parallel, activation_checkpointing = "fsdp", False

    rt = Runtime.__new__(Runtime)
    object.__setattr__(rt, "dist", Dist())
    object.__setattr__(rt, "run", Run())
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="--run.parallel fsdp is for fastmae pretrain and finetune"):
        parallelize(rt, model, torch.optim.SGD(model.parameters(), lr=0.1), shardable=False)


@pytest.mark.slow
def test_two_nodes_through_the_c10d_rendezvous_see_disjoint_halves(tmp_path):
    """Two torchrun launchers (--nnodes 2, one process each, --node_rank 0 and 1) meet at a c10d rendezvous on
    localhost, as two machines would at HOST:PORT; each reads its own half of the shards."""
    from tests.conftest import free_port
    from tests.data.test_shards import write_shards

    write_shards(tmp_path / "sh", [8] * 4, hw=(8, 8))
    helper = Path(__file__).parents[1] / "helpers" / "rdzv_worker.py"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(helper.parents[2])}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i),
                               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", "fastmae-test", str(helper),
                               str(tmp_path / "sh" / "part-{000..003}.tar"), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert all(g["world"] == 2 for g in got)
    a, b = set(got[0]["seen"]), set(got[1]["seen"])
    assert len(got[0]["seen"]) == len(got[1]["seen"]) == 16 and not a & b and a | b == set(range(32))
