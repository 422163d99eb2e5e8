"""Helpers the command tests share: tiny Fashion-MNIST files, a tiny pretraining run and its flags."""

from __future__ import annotations

import gzip
import struct

import numpy as np

from fastmae.cli import main
from fastmae.commands.pretrain import PretrainConfig


def write_idx(folder, prefix: str, n: int, seed: int = 0) -> None:
    """A tiny Fashion-MNIST-format IDX pair: images with a class-dependent bright square."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    imgs = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = 2 * (y % 5) + 2, 12 * (y // 5) + 2
        imgs[i, r : r + 10, c : c + 10] = 220
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.tobytes())



def make_fmnist(root, n_train: int = 96, n_test: int = 40):
    """A folder `root/fmnist` holding a tiny Fashion-MNIST-format train/t10k pair; returns it."""
    d = root / "fmnist"
    d.mkdir()
    write_idx(d, "train", n_train, seed=0)
    write_idx(d, "t10k", n_test, seed=1)
    return d



def pretrain_tiny(root, n_train: int = 96, n_test: int = 40):
    """(data folder, run folder) of a finished 1-epoch tiny pretraining run under root (no figure, no kNN)."""
    data = make_fmnist(root, n_train, n_test)
    run = root / "run"
    assert main(tiny_args(data, run, epochs=1) + ["--knn_every", "-1", "--figure_every", "0"]) == 0
    return data, run



def tiny_args(data_dir, out_dir, epochs: int = 2) -> list[str]:
    return [
        "pretrain", "--data.path", str(data_dir), "--run.output_dir", str(out_dir), "--run.no_progress",
        "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2",
        "--model.decoder_embed_dim", "16", "--model.decoder_depth", "1", "--model.decoder_num_heads", "2",
        "--optim.epochs", str(epochs), "--optim.warmup_epochs", "1", "--optim.batch_size", "32",
        "--run.save_every", "1", "--run.precision", "fp32", "--knn_every", "1", "--model.norm_pix_loss",
    ]



def tiny_cfg(data_dir, out_dir, epochs: int = 2) -> PretrainConfig:
    import tyro

    return tyro.cli(PretrainConfig, args=tiny_args(data_dir, out_dir, epochs)[1:], use_underscores=True)

