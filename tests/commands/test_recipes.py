"""Named recipes: defined once, listed in --help, overridden by flags; the learning-curve figure of a run."""

from __future__ import annotations

import json

import pytest

from fastmae import recipes
from fastmae.cli import main, parse
from fastmae.commands.finetune import FinetuneConfig
from fastmae.commands.linprobe import LinprobeConfig
from fastmae.commands.pretrain import PretrainConfig
from fastmae.config import replace, validate
from fastmae.figures.curves import (
    FINETUNE_METRIC,
    epoch_entries,
    plot_learning_curve,
    plot_runs,
    spread,
)
from tests.helpers.cli import make_fmnist, tiny_args


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


def test_plot_runs_draws_one_curve_per_run_and_refuses_a_log_without_the_metric(tmp_path):
    logs = {}
    for name, top1 in (("mae", [80.0, 90.0]), ("random", [70.0, 75.0])):
        logs[name] = tmp_path / f"{name}.jsonl"
        logs[name].write_text("\n".join(json.dumps({"epoch": i + 1, "loss": 1.0, "top1": t})
                                        for i, t in enumerate(top1)))
    out = plot_runs(logs, tmp_path / "curves.png", metric=FINETUNE_METRIC)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "pre.jsonl").write_text(json.dumps({"epoch": 1, "loss": 0.3, "knn_top1": 50.0}))
    with pytest.raises(ValueError, match="has no epoch with 'top1'"):
        plot_runs({"pre": tmp_path / "pre.jsonl"}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("heights", [[100.0, 100.5, 50.0], [0.0, 1.0, 2.0, 30.0], [0.0, 20.0, 40.0], [5.0, 5.0],
                                     [30.0, 0.0, 8.0, 16.0, 24.5], []])
def test_end_labels_are_spread_apart_and_stay_near_their_curves(heights):
    """Two runs ending at 93.43 and 93.45 printed their last values over each other; labels now keep a gap."""
    gap = 9.0
    out = spread(heights, gap)
    assert len(out) == len(heights)
    ys = sorted(out)
    assert all(b - a >= gap - 1e-9 for a, b in zip(ys, ys[1:]))
    assert sorted(range(len(out)), key=lambda i: (out[i], i)) == sorted(range(len(heights)),
                                                                       key=lambda i: (heights[i], i))  # order kept
    assert all(abs(o - h) <= gap * len(heights) / 2 for o, h in zip(out, heights))
    if heights and all(b - a >= gap for a, b in zip(sorted(heights), sorted(heights)[1:])):
        assert out == heights  # apart already: untouched


def test_pretrain_writes_the_learning_curve(tmp_path, capsys):
    data = make_fmnist(tmp_path, 64, 16)
    assert main(tiny_args(data, tmp_path / "run", epochs=2)) == 0
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000
    assert "learning curve" in capsys.readouterr().out


def test_finetune_curves_benchmark_tables_every_epoch_of_each_run(tmp_path, capsys):
    from benchmarks.finetune_curves import main as curves_main

    for name, top1 in (("a", [80.0, 90.5]), ("b", [70.0])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("\n".join(
            json.dumps({"epoch": i + 1, "loss": 1.0, "top1": t, "epoch_seconds": 10.0 * (i + 1)})
            for i, t in enumerate(top1)))
    out = tmp_path / "c.png"
    assert curves_main([f"MAE={tmp_path / 'a'}", f"random={tmp_path / 'b'}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 2 | 90.50 |  |" in text and "| 1 | 80.00 | 70.00 |" in text and "MAE 20 s/epoch" in text
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit):
        curves_main([str(tmp_path / "a")])  # no LABEL=
