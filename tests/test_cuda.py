"""CUDA checks: training steps in bf16 / fp16 (GradScaler) through the CLI, checkpoints written on the GPU,
Hugging Face ViTMAE loss parity, seeded masks, torch.compile, a one-process NCCL group, pretraining end to end.

Every test is marked `cuda` and skipped without a CUDA device; `benchmarks/gpu_check.sh` runs this file on a
lent GPU. The CLI helpers (which need tyro) are imported inside the tests, so that on a machine without tyro
the tests that do not use the CLI (parity, masks, NCCL) still run and the others fail with a clear ImportError.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

import fastmae
from fastmae.commands.visualize import seeded_noise
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.masking import random_masking
from fastmae.train.dist import cleanup, init_distributed
from fastmae.weights.checkpoint import list_checkpoints, load_checkpoint
from fastmae.weights.convert import hf_mae_to_fastmae
from tests.conftest import set_torchrun_env
from tests.weights.test_convert import HF_MAE, _perturbed

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
PRECISIONS = ["bf16", "fp16"]


# --------------------------------------------------------------------------------------------- helpers


def run_cli(args: list[str]) -> None:
    """`fastmae ARGS` in this process; fails the test on a non-zero exit code."""
    from fastmae.cli import main

    assert main(args) == 0, f"fastmae {' '.join(args)} failed"


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    """A copy of args with `flag`'s value replaced, or the flag appended when absent."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def tiny_pretrain_args(data: Path, out: Path, precision: str, epochs: int) -> list[str]:
    """The CLI tests' tiny MAE on the tiny IDX set, on the GPU, no kNN or figures (they are not under test)."""
    from tests.helpers.cli import tiny_args

    args = tiny_args(data, out, epochs=epochs)
    for flag, value in (("--run.device", DEVICE), ("--run.precision", precision), ("--knn_every", "-1"),
                        ("--figure_every", "0")):
        args = set_flag(args, flag, value)
    return args


def tiny_finetune_args(data: Path, out: Path, precision: str, epochs: int) -> list[str]:
    """A tiny ViT fine-tuned from random init with the default augmentation (RandAugment, mixup/cutmix) on the GPU."""
    from tests.commands.test_evaluate_cli import TINY_VIT

    return ["finetune", "--init", "random", *TINY_VIT, "--data.path", str(data), "--run.output_dir", str(out),
            "--run.no_progress", "--run.device", DEVICE, "--run.precision", precision, "--optim.epochs", str(epochs),
            "--optim.warmup_epochs", "1", "--optim.batch_size", "32", "--run.save_every", "1"]


@pytest.fixture()
def fmnist(tmp_path: Path) -> Path:
    """The tiny Fashion-MNIST-format IDX folder of the CLI tests (96 train, 40 test images)."""
    from tests.helpers.cli import make_fmnist

    return make_fmnist(tmp_path)


def epoch_losses(out: Path) -> list[float]:
    """The per-epoch training losses a run logged in log.jsonl."""
    return [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


def assert_all_finite(state: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        assert torch.isfinite(v.float()).all(), k


def changed_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def train_twice_and_check(args_for_epochs, out: Path, precision: str) -> dict:
    """Run 1 epoch, then the same command for 2 epochs (which resumes from the GPU-written checkpoint).

    Checks: finite losses; the second epoch changed (nearly) every weight from the first epoch's checkpoint;
    the optimizer moved on; fp16 runs saved a finite GradScaler scale; `fastmae.load` on the run folder gives
    exactly the saved weights. Returns the final checkpoint state.
    """
    run_cli(args_for_epochs(1))
    first, _ = load_checkpoint(out)
    assert first["epoch"] == 1
    assert_all_finite(first["model"])
    run_cli(args_for_epochs(2))
    last, meta = load_checkpoint(out)
    assert last["epoch"] == 2 and last["step"] > first["step"]
    losses = epoch_losses(out)
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert_all_finite(last["model"])
    changed = changed_tensors(first["model"], last["model"])
    assert len(changed) >= 0.9 * len(first["model"]), f"only {len(changed)} of {len(first['model'])} tensors moved"
    assert last["optimizer"]["state"], "no AdamW state was saved"
    if precision == "fp16":
        scale = last["scaler"]["scale"]
        assert 0 < float(scale) < float("inf"), last["scaler"]
    else:
        assert last["scaler"] == {}
    loaded = fastmae.load(out)
    assert not changed_tensors(loaded.state_dict(), last["model"])
    assert meta["config"]["run"]["precision"] == precision
    return last


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pretrain_steps_and_checkpoint_round_trip(fmnist, tmp_path, precision):
    out = tmp_path / "pre"
    train_twice_and_check(lambda epochs: tiny_pretrain_args(fmnist, out, precision, epochs), out, precision)
    model = fastmae.load(out).to(DEVICE)
    imgs = torch.randn(4, 1, 28, 28, device=DEVICE)
    with torch.no_grad():
        loss, _, mask = model(imgs, 0.75)
    assert torch.isfinite(loss) and mask.device.type == DEVICE


@pytest.mark.parametrize("precision", PRECISIONS)
def test_finetune_steps_and_checkpoint_round_trip(fmnist, tmp_path, precision):
    out = tmp_path / "ft"
    train_twice_and_check(lambda epochs: tiny_finetune_args(fmnist, out, precision, epochs), out, precision)
    res = json.loads((out / "finetune.json").read_text())
    assert res["epochs_done"] == 2 and 0 <= res["best_top1"] <= 100
    assert (out / "best.pt").exists()


def hf_mae_config_kwargs() -> dict:
    """A small ViTMAE with 64-wide attention heads (the head width of ViT-B/L, which picks the CUDA SDPA kernel)."""
    return {**HF_MAE, "image_size": 64, "patch_size": 8, "hidden_size": 256, "num_attention_heads": 4,
            "intermediate_size": 1024, "decoder_hidden_size": 128, "decoder_num_attention_heads": 2,
            "decoder_intermediate_size": 512}


def test_hf_vitmae_loss_parity_on_cuda(monkeypatch):
    """Same weights, images and noise: fastmae and ViTMAEForPreTraining agree on CUDA (fp32, TF32 off), and
    fastmae on CUDA agrees with fastmae on the CPU."""
    tf = pytest.importorskip("transformers")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = tf.ViTMAEConfig(**hf_mae_config_kwargs(), norm_pix_loss=True, mask_ratio=0.75,
                          attn_implementation="sdpa")
    hf = _perturbed(tf.ViTMAEForPreTraining(cfg))
    sd, kw = hf_mae_to_fastmae(hf.state_dict(), hf.config)
    ours = MaskedAutoencoderViT(**kw).eval()
    ours.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(5)
    imgs, noise = torch.randn(8, 3, 64, 64, generator=g), torch.rand(8, 64, generator=g)  # (B, C, H, W), (B, L)
    with torch.no_grad():
        cpu_loss, cpu_pred, cpu_mask = ours(imgs, 0.75, noise=noise)
        hf, ours = hf.to(DEVICE), ours.to(DEVICE)
        x, n = imgs.to(DEVICE), noise.to(DEVICE)
        out = hf(pixel_values=x, noise=n)
        loss, pred, mask = ours(x, 0.75, noise=n)
    assert torch.equal(mask, out.mask) and torch.equal(mask.cpu(), cpu_mask)
    torch.testing.assert_close(loss, out.loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss.cpu(), cpu_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.cpu(), cpu_pred, atol=1e-4, rtol=1e-4)


def test_seeded_mask_reproducible_on_cuda_and_equal_to_cpu():
    x = torch.randn(6, 49, 32)  # (B, L, D)
    noise = seeded_noise(6, 49, seed=7)  # (B, L), the visualizer's private-generator noise
    cpu = random_masking(x, 0.75, noise)
    gpu_a = random_masking(x.to(DEVICE), 0.75, noise.to(DEVICE))
    gpu_b = random_masking(x.to(DEVICE), 0.75, seeded_noise(6, 49, seed=7, device=DEVICE))
    for a, b, c in zip(cpu, gpu_a, gpu_b):
        assert torch.equal(a, b.cpu()) and torch.equal(b, c)
    # noise=None draws from the CUDA generator, as the official code does: the same seed gives the same mask
    masks = []
    for _ in range(2):
        torch.manual_seed(11)  # seeds the CUDA generators too
        masks.append(random_masking(x.to(DEVICE), 0.75)[1])
    assert torch.equal(masks[0], masks[1]) and masks[0].sum() == 6 * (49 - 12)


def test_compiled_pretrain_step(fmnist, tmp_path):
    out = tmp_path / "compiled"
    run_cli(tiny_pretrain_args(fmnist, out, "bf16", epochs=1) + ["--run.compile"])
    state, _ = load_checkpoint(out)
    assert not [k for k in state["model"] if "_orig_mod" in k], "checkpoint keys carry torch.compile's prefix"
    assert_all_finite(state["model"])
    assert all(map(torch.isfinite, torch.tensor(epoch_losses(out))))
    fastmae.load(out)  # loads strictly into a plain model


def test_one_process_nccl_group(monkeypatch):
    """torchrun's environment for one process on one GPU: init_distributed joins an NCCL group that works."""
    set_torchrun_env(monkeypatch)
    try:
        info = init_distributed(DEVICE, 60)
        assert tdist.is_initialized() and tdist.get_backend() == "nccl"
        assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
        x = torch.arange(4.0, device=DEVICE)
        tdist.all_reduce(x)
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
        tdist.barrier()
    finally:
        cleanup()
    assert not tdist.is_initialized()


def test_pretrain_cli_end_to_end(fmnist, tmp_path, capsys):
    """The plain CLI run of the CPU end-to-end test, on the GPU with auto precision: kNN, figure, TensorBoard."""
    from tests.helpers.cli import tiny_args

    out = tmp_path / "run"
    args = set_flag(set_flag(tiny_args(fmnist, out), "--run.device", DEVICE), "--run.precision", "auto")
    run_cli(args)
    printed = capsys.readouterr().out
    assert f"on {DEVICE}" in printed and "kNN top-1" in printed
    assert (out / "reconstruction.png").stat().st_size > 0 and list((out / "tensorboard").iterdir())
    losses = epoch_losses(out)
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    state, meta = load_checkpoint(out)
    assert state["epoch"] == 2 and meta["kind"] == "mae"
    assert len(list_checkpoints(out)) >= 1


def test_uint8_batches_are_normalised_on_the_gpu(tmp_path):
    """File workers send uint8 pixels; delivered on CUDA they arrive as float32 on the GPU, equal (to float
    rounding of one multiply-add) to the batches delivered on the CPU."""
    import numpy as np
    from PIL import Image

    from fastmae.config import DataConfig
    from fastmae.data import build_loader

    (tmp_path / "img").mkdir()
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"{i}.png")
    cfg = DataConfig(source="unlabelled", path=str(tmp_path / "img"), num_workers=1)
    out = {}
    for device in ("cpu", DEVICE):
        loader = build_loader(cfg, "train", (16, 16), 4, train=True, seed=1)
        loader.set_device(device)
        loader.set_epoch(0)
        out[device] = [x for x, _ in loader]
        loader.close()
    assert all(x.device.type == "cuda" and x.dtype == torch.float32 for x in out[DEVICE])
    for a, b in zip(out["cpu"], out[DEVICE]):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-6, atol=1e-6)
