"""CrossMAE's decoder (`decoder='cross'`): the loss is the MSE of exactly the decoded patches, which are a share of
the masked ones drawn from the mask's own order, the encoder is MAE's, and runs resume, load and convert."""

from __future__ import annotations

import json

import pytest
import torch

import fastmae
from fastmae.cli import main
from fastmae.commands.pretrain import run_pretrain
from fastmae.models.mae import build_mae
from fastmae.weights.checkpoint import load_checkpoint
from tests.helpers.cli import make_fmnist, tiny_args, tiny_cfg

NAME = "mae_vit_tiny_d6_patch4"


def cross(kept: float = 0.25, **kw):
    torch.manual_seed(0)
    return build_mae(NAME, img_size=(28, 28), in_chans=1, decoder="cross", kept_mask_ratio=kept, **kw)


def test_loss_is_the_mse_of_exactly_the_decoded_masked_patches():
    m = cross(0.25, norm_pix_loss=True).eval()
    x = torch.randn(3, 1, 28, 28)
    noise = torch.rand(3, 49, generator=torch.Generator().manual_seed(1))
    loss, pred, mask = m(x, 0.75, noise)
    decoded = pred.abs().sum(-1) > 0  # (B, L): the patches that got a prediction
    assert (decoded.sum(1) == int(49 * 0.25)).all()  # 12 of 49
    assert (mask[decoded] == 1).all()  # all of them masked
    # the same patches again from the same noise: the first 12 masked ones of the noise's order
    order = noise.argsort(1)
    K = 49 - int(mask[0].sum())
    expect = torch.zeros(3, 49, dtype=torch.bool).scatter(1, order[:, K : K + 12], True)
    assert torch.equal(decoded, expect)
    target = m.target(x)
    direct = ((pred - target) ** 2).mean(-1)[decoded].mean()
    torch.testing.assert_close(loss, direct)


def test_kept_ratio_zero_decodes_every_masked_patch_and_bad_ratios_are_refused():
    m = cross(0.0).eval()
    loss, pred, mask = m(torch.randn(2, 1, 28, 28), 0.75)
    assert torch.equal(pred.abs().sum(-1) > 0, mask.bool())
    with pytest.raises(ValueError, match="above the mask ratio"):
        cross(0.5)(torch.randn(2, 1, 28, 28), 0.4)
    with pytest.raises(ValueError, match="the self decoder decodes every masked patch"):
        build_mae(NAME, kept_mask_ratio=0.25)


def test_encoder_is_maes_in_names_and_shapes():
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()
                        if not k.startswith(("decoder", "mask_token"))}
    torch.manual_seed(0)
    assert shapes(cross()) == shapes(build_mae(NAME, img_size=(28, 28), in_chans=1))


def test_cross_runs_resume_bit_exactly_load_convert_and_refuse_bad_flags(tmp_path, monkeypatch, capsys):
    import fastmae.train.trainer as trainer
    import tyro

    from fastmae.commands.pretrain import PretrainConfig

    data = make_fmnist(tmp_path)
    flags = ["--model.decoder", "cross", "--model.kept_mask_ratio", "0.25", "--knn_every", "-1", "--figure_every", "0"]

    def cfg(out):
        return tyro.cli(PretrainConfig, args=tiny_args(data, out, epochs=2)[1:] + flags, use_underscores=True)

    run_pretrain(cfg(tmp_path / "full"))
    calls = {"n": 0}

    def fake_stop(self):  # SIGTERM after 4 steps: mid epoch 2
        calls["n"] += 1
        if calls["n"] >= 4:
            self.signal = 15
        return self.signal is not None

    monkeypatch.setattr(trainer.StopFlag, "__call__", fake_stop)
    run_pretrain(cfg(tmp_path / "part"))
    monkeypatch.undo()
    run_pretrain(cfg(tmp_path / "part"))
    a, b = (load_checkpoint(tmp_path / d)[0]["model"] for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # time on the learning curve: the run's wall clock grows across the resume
    elapsed = [json.loads(line)["elapsed_seconds"] for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()
               if '"epoch"' in line and '"loss"' in line]
    assert len(elapsed) == 2 and 0 < elapsed[0] < elapsed[1]
    model = fastmae.load(tmp_path / "full")
    assert (model.decoder, model.kept_mask_ratio) == ("cross", 0.25)
    assert main(["convert", "--init", str(tmp_path / "full"), "--to", "hf", "--output", str(tmp_path / "hf")]) == 2
    assert "cross-attention decoder" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert main(["convert", "--init", str(tmp_path / "full"), "--to", "fastmae", "--output", str(tmp_path / "x")]) == 0
    assert fastmae.load(tmp_path / "x").decoder == "cross"
    assert main(["knn", "--init", str(tmp_path / "full"), "--data.path", str(data), "--run.output_dir",
                 str(tmp_path / "k"), "--run.precision", "fp32"]) == 0  # the encoder serves every other command
    bad = tiny_args(data, tmp_path / "bad", epochs=1)
    assert main(bad + ["--model.kept_mask_ratio", "0.25"]) == 2
    assert "is for --model.decoder cross" in capsys.readouterr().err
    assert main(bad + ["--model.decoder", "cross", "--model.kept_mask_ratio", "0.9"]) == 2
    assert "above --model.mask_ratio 0.75" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work
    # an MAE with the other decoder as --init: its encoder, a fresh decoder
    assert main(tiny_args(data, tmp_path / "from", epochs=1) + ["--init", str(tmp_path / "full"),
                                                                 "--knn_every", "-1", "--figure_every", "0"]) == 0
    assert "its decoder is not a --model.decoder self one: a fresh decoder" in capsys.readouterr().out
