"""Issue #29, principle 1: a run folder holds one command's run; another command's output there is refused before
anything is written, whether the folder records its owner (.fastmae.command) or predates that file."""

from __future__ import annotations

import json

import pytest

from fastmae.cli import main
from fastmae.train.owner import OWNER_NAME, claim, folder_command
from tests.helpers.cli import pretrain_tiny

EVAL = ["--run.no_progress", "--run.precision", "fp32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain_tiny(tmp_path_factory.mktemp("owner"), n_train=48, n_test=24)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".fastmae.lock"}


@pytest.mark.parametrize("argv", [
    ["linprobe", "--optim.epochs", "1"],
    ["knn"],
    ["embed", "--embed.split", "train"],
    ["finetune", "--optim.epochs", "1"],
])
def test_another_command_into_a_pretraining_run_is_refused_and_changes_nothing(pretrained, argv, capsys):
    data, run = pretrained
    before = _snapshot(run)
    assert main([*argv, "--init", str(run), "--data.path", str(data), "--run.output_dir", str(run), *EVAL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"fastmae: error: --run.output_dir {run} holds a `fastmae pretrain` run (a folder holds one "
                       f"command's run, so none overwrites another's files); pass another --run.output_dir for "
                       f"`fastmae {argv[0]}`")
    assert _snapshot(run) == before


def test_knn_then_linprobe_in_one_folder_is_refused(pretrained, tmp_path, capsys):
    data, run = pretrained
    out = tmp_path / "eval"
    assert main(["knn", "--init", str(run), "--data.path", str(data), "--run.output_dir", str(out), *EVAL]) == 0
    before = _snapshot(out)
    assert main(["linprobe", "--init", str(run), "--data.path", str(data), "--run.output_dir", str(out),
                 "--optim.epochs", "1", *EVAL]) == 2
    assert "holds a `fastmae knn` run" in capsys.readouterr().err
    assert _snapshot(out) == before and json.loads((out / OWNER_NAME).read_text()) == {"command": "knn"}
    # the same command again is its own business (here: refused without --knn.overwrite, then allowed with it)
    assert main(["knn", "--init", str(run), "--data.path", str(data), "--run.output_dir", str(out),
                 "--knn.overwrite", *EVAL]) == 0


def test_folders_written_before_the_owner_file_are_recognised(pretrained, tmp_path):
    data, run = pretrained
    (run / OWNER_NAME).rename(tmp_path / "kept")
    try:
        assert folder_command(run) == "pretrain"  # from its checkpoints' kind
        with pytest.raises(ValueError, match="holds a `fastmae pretrain` run"):
            claim(run, "linprobe")
        assert not (run / OWNER_NAME).exists()
    finally:
        (tmp_path / "kept").rename(run / OWNER_NAME)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "segment.json").write_text("{}")
    assert folder_command(legacy) is None  # a result file alone may be the user's own (it is not replaced: round 4)
    (legacy / "config.json").write_text("{}")  # beside the config a run writes first, it is a run's
    assert folder_command(legacy) == "segment"


def test_a_folder_a_refused_start_left_is_free(tmp_path):
    """A run refused after its claim (bad data, say) left only the owner file: another command may take the folder."""
    out = tmp_path / "r"
    (out / "tensorboard").mkdir(parents=True)
    claim(out, "knn")
    claim(out, "pose")
    assert folder_command(out) == "pose"
    (out / "pose.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a `fastmae pose` run"):
        claim(out, "knn")


def test_outputs_named_after_inputs_never_collide():
    """visualize --per_image names each PNG after its input: a/x.png, b/x.png, x-1.png, X.png give four files,
    also on a case-insensitive file system."""
    from fastmae.commands.visualize import unique_names

    names = unique_names(["x", "x", "x-1", "X"])
    assert names == ["x", "x-1", "x-1-1", "X-2"] and len({n.casefold() for n in names}) == 4
