"""`fastmae embed`: features of a dataset to disk (safetensors / npy), labels, row order; errors are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import fastmae
from fastmae import encode
from fastmae.cli import main
from fastmae.config import DataConfig
from fastmae.data import build_loader
from tests.helpers.cli import pretrain_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, a 1-epoch tiny pretraining run)."""
    return pretrain_tiny(tmp_path_factory.mktemp("embed"), n_train=48, n_test=24)


def _embed(data, run, out, *extra) -> int:
    return main(["embed", "--init", str(run), "--data.path", str(data), "--run.output_dir", str(out),
                 "--run.no_progress", "--run.precision", "fp32", *extra])


def test_embed_fashion_mnist_safetensors_matches_encode(trained, tmp_path):
    data, run = trained
    out = tmp_path / "e"
    assert _embed(data, run, out, "--embed.pool", "avg") == 0
    tr, ev = load_file(out / "train.safetensors"), load_file(out / "eval.safetensors")
    assert tr["features"].shape == (48, 32) and ev["features"].shape == (24, 32)
    assert tr["labels"].shape == (48,) and tr["labels"].dtype == torch.int64
    with safe_open(out / "train.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["pool"]) == "avg" and "indices 0..N-1" in json.loads(meta["rows"])
    # the same numbers as encoding the first images by hand with the loaded MAE
    mae = fastmae.load(run)
    dcfg = DataConfig(path=str(data), mean=mae.data_mean, std=mae.data_std)
    loader = build_loader(dcfg, "train", (28, 28), 16, train=False, seed=0, drop_last=False)
    loader.set_epoch(0)
    imgs, labels = next(iter(loader))
    with torch.no_grad():
        assert torch.allclose(encode(mae, imgs, "avg"), tr["features"][:16], atol=1e-5)
    assert torch.equal(labels, tr["labels"][:16])
    assert _embed(data, run, out, "--embed.pool", "avg") == 2  # exists: refused without --overwrite
    assert _embed(data, run, out, "--embed.pool", "token", "--embed.overwrite", "--embed.split", "train") == 0
    assert not torch.equal(load_file(out / "train.safetensors")["features"], tr["features"])
    config = (out / "config.json").read_text()
    assert json.loads(config)["embed"]["pool"] == "token"  # the config of the files there
    # a run into the same folder that fails once under way (here: no class folders) leaves config.json alone
    assert _embed(data, run, out, "--data.source", "folder", "--embed.overwrite", "--embed.split", "eval") == 2
    assert (out / "config.json").read_text() == config


def test_embed_folder_dense_npy_with_file_list(trained, tmp_path):
    _, run = trained
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (30, 26), dtype=np.uint8)).save(imgs / f"im{i}.png")
    out = tmp_path / "d"
    assert main(["embed", "--init", str(run), "--data.source", "unlabelled", "--data.path", str(imgs),
                 "--data.num_workers", "0", "--embed.split", "train", "--embed.pool", "dense", "--embed.format", "npy",
                 "--run.output_dir", str(out), "--run.no_progress", "--run.precision", "fp32"]) == 0
    feats = np.load(out / "train.features.npy")
    assert feats.shape == (5, 32, 7, 7)
    assert not (out / "train.labels.npy").exists()  # unlabelled source: no labels
    files = (out / "train.txt").read_text().splitlines()
    assert sorted(files) == sorted(str(p) for p in imgs.iterdir()) and len(files) == 5
    assert json.loads((out / "train.json").read_text())["shape"] == [5, 32, 7, 7]


@pytest.mark.parametrize("argv,message", [
    (["--embed.pool", "max"], "--embed.pool must be one of avg, token, dense, got max"),
    (["--init", "no/such/run"], "no/such/run does not exist"),
    (["--embed.format", "csv"], "--embed.format must be one of safetensors, npy, got csv"),
])
def test_bad_inputs_are_one_line(trained, tmp_path, capsys, argv, message):
    data, run = trained
    assert _embed(data, run, tmp_path / "bad", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_split_that_fails_leaves_the_folder_as_it_was(trained, tmp_path, capsys):
    """Issue #29: a corrupt evaluation image left new train features (and, with --embed.overwrite, beside the old
    eval ones and the old config.json); then the rerun was refused. Now nothing is written unless every split is."""
    _, run = trained
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "val" / "b" / "2.png").write_bytes(b"not a png")
    out = tmp_path / "o"
    args = ["embed", "--init", str(run), "--data.source", "folder", "--data.path", str(tmp_path / "train"),
            "--data.eval_path", str(tmp_path / "val"), "--data.num_workers", "0", "--run.output_dir", str(out),
            "--run.no_progress", "--run.precision", "fp32"]
    assert main(args) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
    (tmp_path / "val" / "b" / "2.png").unlink()
    assert main(args) == 0  # the rerun is not refused
    assert (out / "train.safetensors").exists() and (out / "eval.safetensors").exists()
