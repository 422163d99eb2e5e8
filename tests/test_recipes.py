"""Named recipes: defined once, listed in --help, overridden by flags; the learning-curve figure of a run."""

from __future__ import annotations

import json

import pytest

from fastmae import recipes
from fastmae.cli import main, parse
from fastmae.config import (
    FinetuneConfig,
    LinprobeConfig,
    PretrainConfig,
    replace,
    validate,
)
from fastmae.curves import epoch_entries, plot_learning_curve

from .test_cli_pretrain import make_fmnist, tiny_args


@pytest.mark.parametrize("command,cls", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig),
                                         ("linprobe", LinprobeConfig)])
def test_every_recipe_is_a_valid_config_with_its_command_and_figure(command, cls):
    for name, fn in recipes.RECIPES[command].items():
        cfg = fn()
        assert type(cfg) is cls and cfg.recipe == name
        validate(cfg)
        assert f"fastmae {command}" in fn.__doc__ and "Produced" in fn.__doc__  # the command and what it gave


def test_fmnist_small_pretrain_is_the_default_run():
    assert recipes.pretrain_fmnist_small() == replace(PretrainConfig(), recipe="fmnist-small")


def test_flags_override_the_recipe_wherever_they_stand():
    cfg = parse(["pretrain", "--optim.epochs", "3", "--recipe", "paper", "--model.mask_ratio", "0.6"])
    assert cfg.recipe == "paper" and cfg.optim.epochs == 3 and cfg.model.mask_ratio == 0.6
    assert cfg.optim.blr == 1.5e-4 and cfg.model.name == "mae_vit_large_patch16"  # the rest is the recipe's
    assert cfg.model.norm_pix_loss and cfg.data.crop_scale == (0.2, 1.0)
    ft = parse(["finetune", "--recipe=paper", "--init", "x"])
    assert ft.layer_decay == 0.65 and ft.init == "x"


def test_unknown_recipe_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["pretrain", "--recipe", "imagenet-huge"])
    assert e.value.code == 2
    assert "unknown --recipe 'imagenet-huge' for `fastmae pretrain`; recipes: fmnist-small, paper" in \
        capsys.readouterr().err


def test_help_lists_the_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "fmnist-small" in capsys.readouterr().out


def test_learning_curve_skips_events_and_keeps_the_last_line_per_epoch(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"epoch": 1, "loss": 0.5}, {"event": "preempted", "epoch": 1, "batch": 3},
             {"epoch": 1, "loss": 0.4, "knn_top1": 60.0}, {"epoch": 2, "loss": 0.3, "knn_top1": 70.0}]
    log.write_text("\n".join(map(json.dumps, lines)) + "\n{torn")
    assert [e["loss"] for e in epoch_entries(log)] == [0.4, 0.3]
    out = plot_learning_curve(log, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_learning_curve(tmp_path / "empty.jsonl", tmp_path / "x.png") is None


def test_pretrain_writes_the_learning_curve(tmp_path, capsys):
    data = make_fmnist(tmp_path, 64, 16)
    assert main(tiny_args(data, tmp_path / "run", epochs=2)) == 0
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000
    assert "learning curve" in capsys.readouterr().out
