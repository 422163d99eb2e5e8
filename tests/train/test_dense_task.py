"""The dense-task contract (train/dense.py, fastmae/tasks.py): one registry row per task feeds the CLI, the folder
owner and conversion; every task runs end to end through `run_dense` with its loss terms logged apart, its metric
every --*.eval_every epochs, its learning curve and its result file."""

from __future__ import annotations

import importlib
import json

import pytest

from fastmae.cli import COMMANDS, main
from fastmae.tasks import DENSE_KINDS, DENSE_TASKS
from fastmae.train.dense import DenseTask
from fastmae.train.owner import COMMAND_OF_KIND, RESULT_OF
from tests.helpers.cli import make_fmnist

TINY = ["--init", "random", "--model.name", "vit_tiny_patch4", "--model.embed_dim", "16", "--model.depth", "1",
        "--model.num_heads", "2", "--optim.epochs", "2", "--optim.batch_size", "8", "--run.no_progress",
        "--run.precision", "fp32", "--data.num_workers", "1"]
SCENES = {  # each task's built-in data, tiny; its section's eval_every
    "segment": ["--seg.train_scenes", "16", "--seg.eval_scenes", "8", "--seg.scene_size", "32", "--seg.eval_every",
                "1", "--seg.figure_rows", "1"],
    "detect": ["--det.train_scenes", "16", "--det.eval_scenes", "8", "--det.scene_size", "32", "--det.eval_every", "1",
               "--det.channels", "8", "--det.figure_rows", "1"],
    "pose": ["--pose.train_images", "16", "--pose.eval_images", "8", "--pose.eval_every", "1", "--pose.figure_rows",
             "1", "--pose.channels", "8", "--pose.head", "classic"],
}
TERMS = {"segment": {"loss_ce"}, "detect": {"loss_focal", "loss_box"}, "pose": {"loss_heatmap"}}


@pytest.mark.parametrize("row", DENSE_TASKS, ids=lambda r: r.command)
def test_one_registry_row_feeds_the_cli_the_owner_and_conversion(row):
    module = importlib.import_module(row.module)
    task = module.TASK
    assert isinstance(task, DenseTask) and task.row is row
    assert COMMANDS[row.command] == (getattr(module, row.config), f"{row.module}:{row.runner}")
    assert RESULT_OF[row.result] == row.command and COMMAND_OF_KIND[row.kind] == f"fastmae {row.command}"
    assert row.kind in DENSE_KINDS and row.command in SCENES  # this file runs every task


@pytest.mark.parametrize("row", DENSE_TASKS, ids=lambda r: r.command)
def test_every_task_end_to_end_logs_its_loss_terms_metric_and_curve(tmp_path, row):
    data = make_fmnist(tmp_path)
    out = tmp_path / row.command
    task = importlib.import_module(row.module).TASK
    assert main([row.command, "--data.path", str(data), "--run.output_dir", str(out), *TINY, *SCENES[row.command]]) == 0
    result = json.loads((out / row.result).read_text())
    assert result["epochs"] == 2 and result["train"] > 0 and task.metric[0] in result
    epochs = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "epoch" in e and "loss" in e]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert TERMS[row.command] <= set(e) and task.metric[0] in e  # each term apart, the score every epoch
        assert e["loss"] == pytest.approx(sum(e[k] for k in TERMS[row.command]), rel=1e-4)
    assert epochs[-1][task.metric[0]] == pytest.approx(result[task.metric[0]])  # the last epoch's score is the result
    assert (out / "learning_curve.png").stat().st_size > 0
