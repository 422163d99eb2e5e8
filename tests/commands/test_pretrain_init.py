"""`fastmae pretrain --init`: continue from a full MAE or an encoder-only checkpoint, sizes from the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import fastmae.commands.pretrain as pretrain
from fastmae.cli import main
from fastmae.models.pos_embed import resample_pos_embed
from fastmae.weights.checkpoint import load_checkpoint
from tests.helpers.cli import pretrain_tiny, tiny_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, a finished 1-epoch tiny pretraining run) shared by the tests here."""
    return pretrain_tiny(tmp_path_factory.mktemp("init"), n_train=64, n_test=32)


def _start_weights(monkeypatch, argv) -> dict[str, torch.Tensor]:
    """The model's weights as `fit` receives them (fit itself is skipped)."""
    seen = {}

    def fake_fit(rt, task, *args, **kw):
        seen.update({k: v.detach().clone() for k, v in task.model.state_dict().items()})
        return pretrain.Progress(), None

    monkeypatch.setattr(pretrain, "fit", fake_fit)
    assert main(argv) == 0
    return seen


def _args(data, out, *extra) -> list[str]:
    return tiny_args(data, out, epochs=1) + ["--knn_every", "-1", "--figure_every", "0", *extra]


def test_full_mae_init_copies_encoder_and_decoder(trained, tmp_path, monkeypatch, capsys):
    data, run = trained
    ckpt = load_checkpoint(run)[0]["model"]
    start = _start_weights(monkeypatch, _args(data, tmp_path / "b", "--init", str(run)))
    assert start.keys() == ckpt.keys()
    for k in ckpt:
        assert torch.equal(start[k], ckpt[k]), k
    assert "encoder and decoder from the checkpoint" in capsys.readouterr().out


def test_encoder_only_init_keeps_a_fresh_decoder_and_says_so(trained, tmp_path, monkeypatch, capsys):
    data, run = trained
    ckpt = load_checkpoint(run)[0]["model"]
    enc = tmp_path / "mae_encoder.pth"  # the official encoder-only layout: {'model': encoder tensors}
    torch.save({"model": {k: v for k, v in ckpt.items() if not k.startswith(("decoder_", "mask_token"))}}, enc)
    start = _start_weights(monkeypatch, _args(data, tmp_path / "c", "--init", str(enc)))
    assert "decoder freshly initialised" in capsys.readouterr().out
    assert torch.equal(start["blocks.1.mlp.fc2.weight"], ckpt["blocks.1.mlp.fc2.weight"])
    assert torch.equal(start["norm.weight"], ckpt["norm.weight"])
    assert not torch.equal(start["decoder_pred.weight"], ckpt["decoder_pred.weight"])
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "init" and e["kind"] == "encoder" for e in log)


def test_other_img_size_resamples_positions(trained, tmp_path, monkeypatch):
    data, run = trained
    ckpt = load_checkpoint(run)[0]["model"]
    start = _start_weights(monkeypatch, _args(data, tmp_path / "d", "--init", str(run), "--model.img_size", "32", "32"))
    assert start["pos_embed"].shape == (1, 1 + 64, 32)
    assert torch.equal(start["pos_embed"], resample_pos_embed(ckpt["pos_embed"], (8, 8), (7, 7)))


def test_contradicting_flags_are_one_error(trained, tmp_path, capsys):
    data, run = trained
    argv = _args(data, tmp_path / "e", "--init", str(run))
    argv[argv.index("--model.depth") + 1] = "3"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model.depth 3 (checkpoint: 2)" in err[0]


def test_init_end_to_end_and_resume_takes_precedence(trained, tmp_path, capsys):
    data, run = trained
    out = tmp_path / "f"
    assert main(_args(data, out, "--init", str(run))) == 0
    assert load_checkpoint(out)[0]["epoch"] == 1
    capsys.readouterr()
    argv = _args(data, out, "--init", str(run))
    argv[argv.index("--optim.epochs") + 1] = "2"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "takes precedence" in printed
    assert load_checkpoint(out)[0]["epoch"] == 2
