"""`fastmae bench` end to end on a tiny model: the table's rows, the loader verdict, the JSON, bad input."""

from __future__ import annotations

import json

import pytest

from fastmae.cli import main
from fastmae.commands import bench as command
from tests.helpers.cli import make_fmnist

TINY = ["--model.embed_dim", "32", "--model.depth", "1", "--model.num_heads", "2", "--model.decoder_embed_dim", "16",
        "--model.decoder_depth", "1", "--model.decoder_num_heads", "2", "--bench.batch_size", "8",
        "--bench.rounds", "1", "--bench.round_seconds", "0.05", "--bench.quiet_wait", "0", "--run.precision", "fp32"]


@pytest.fixture(autouse=True)
def small_peak(monkeypatch):
    """The real peak measurement on a 256^3 matmul instead of 2048^3: the tests check plumbing, not speed."""
    real = command.matmul_peak_tflops
    monkeypatch.setattr(command, "matmul_peak_tflops", lambda dtype, device: real(dtype, device, n=256, reps=3))


def test_bench_times_steps_and_loader_and_writes_json(tmp_path, capsys):
    data = make_fmnist(tmp_path, 64, 16)
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--data.path", str(data), "--bench.data_batches", "3", "--run.output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| pretrain | fp32 | fastmae |" in text and "| finetune | fp32 | fastmae |" in text
    assert "is the limit" in text
    res = json.loads(out.read_text())
    pre = next(r for r in res["rows"] if r["case"] == "pretrain")
    assert pre["img_per_s"] > 0 and pre["gflops_per_img"] > 0 and 0 < pre["mfu"]
    assert res["loader"]["images"] == 3 * 8 and res["limit"] in ("the loader", "the model")


def test_bench_compares_with_hf_side_by_side(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["bench", *TINY, "--bench.tasks", "pretrain", "--compare", "hf"]) == 0
    text = capsys.readouterr().out
    assert "| pretrain | fp32 | hf |" in text and "x |" in text  # the fastmae row carries its ratio to HF


def test_bench_bad_input_is_one_line(monkeypatch, capsys):
    assert main(["bench", "--bench.batch_size", "0"]) == 2
    assert "--bench.batch_size must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(command, "hf_available", lambda: False)
    assert main(["bench", *TINY, "--bench.tasks", "pretrain", "--compare", "hf"]) == 2
    assert "--compare hf needs transformers" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["output file exists", "output is a folder", "data path missing", "data too small"])
def test_bench_refuses_before_timing(tmp_path, monkeypatch, capsys, case):
    """Issue #29: these failed after the whole timing (a traceback for a folder, a replaced file, '0 img/s')."""
    def no_timing(*a, **kw):
        raise AssertionError("timed before refusing")

    monkeypatch.setattr(command, "bench_case_fitting", no_timing)
    data = make_fmnist(tmp_path, 64, 16)
    args = ["bench", *TINY, "--data.path", str(data)]
    if case == "output file exists":
        (tmp_path / "old.json").write_text("{}")
        args += ["--run.output", str(tmp_path / "old.json")]
        expect = "exists (an earlier run's results); pass another --run.output"
    elif case == "output is a folder":
        args += ["--run.output", str(tmp_path)]
        expect = "is a folder; pass a file name"
    elif case == "data path missing":
        args = ["bench", *TINY, "--data.path", str(tmp_path / "nowhere")]
        expect = "nowhere"
    else:
        args = ["bench", *TINY, "--data.path", str(data), "--data.limit", "8"]
        expect = "gives 1 training batch of 8: the loader is timed over batches after the first"
    assert main(args) == 2
    assert expect in capsys.readouterr().err
    if case == "output file exists":
        assert (tmp_path / "old.json").read_text() == "{}"
