"""`fastmae.load` from every format, `fastmae visualize` and `fastmae convert` end to end, `reconstruct`,
`encode`, and the demo notebook, from one tiny pretraining run."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.api import encode, load, require_decoder
from fastmae.cli import main
from fastmae.commands.pretrain import run_pretrain
from fastmae.commands.visualize import reconstruct
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.patches import patchify
from fastmae.models.vit import VisionTransformer
from fastmae.weights.checkpoint import load_checkpoint
from fastmae.weights.convert import mae_encoder, read_file
from tests.helpers.cli import make_fmnist, tiny_cfg

REPO = Path(__file__).resolve().parents[2]
SIDE = 28 * 4  # save_figure enlarges 28-pixel images 4x (to at least 112 pixels)
PAD, HEAD = 4, 18


def grid_size(rows: int) -> tuple[int, int]:
    """(width, height) of save_figure's grid: 4 columns of SIDE + padding, a header row."""
    return 4 * (SIDE + PAD) + PAD, HEAD + rows * (SIDE + PAD) + PAD


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-epoch norm-pix MAE pretrained on a tiny IDX dataset, and its checkpoint."""
    root = tmp_path_factory.mktemp("viz")
    data = make_fmnist(root, 64, 16)
    run = root / "run"
    ckpt = run_pretrain(tiny_cfg(data, run, epochs=1))
    state, meta = load_checkpoint(run)
    return SimpleNamespace(root=root, data=data, run=run, ckpt=Path(ckpt), sd=state["model"], meta=meta)


def assert_weights(model: torch.nn.Module, sd: dict) -> None:
    own = model.state_dict()
    assert own.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def images(n: int = 3) -> torch.Tensor:
    """Normalised-looking inputs (B, 1, 28, 28) from a fixed generator."""
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------
# load

def test_load_run_folder_and_checkpoint_file(tiny):
    for src in (tiny.run, tiny.ckpt, str(tiny.ckpt)):
        model = load(src)
        assert isinstance(model, MaskedAutoencoderViT) and not model.training
        assert_weights(model, tiny.sd)
        assert model.norm_pix_loss is True
        assert model.data_mean == tuple(tiny.meta["mean"]) and model.data_std == tuple(tiny.meta["std"])
        assert model.data_stats_known


def test_load_fastmae_export_official_pth_and_hf(tiny, tmp_path):
    # fastmae convert --to fastmae: X.safetensors + X.json (keeps norm_pix_loss and the data statistics)
    assert main(["convert", "--init", str(tiny.run / tiny.ckpt.name), "--output", str(tmp_path / "exp"),
                 "--to", "fastmae"]) == 0
    for src in (tmp_path / "exp.safetensors", tmp_path / "exp"):
        model = load(src)
        assert isinstance(model, MaskedAutoencoderViT) and model.norm_pix_loss
        assert_weights(model, tiny.sd)
        assert model.data_mean == tuple(tiny.meta["mean"])
    # official: {'model': state_dict}, no metadata: norm_pix_loss is not recorded, the stats are defaults,
    # and the heads of non-standard widths (32, 16) must be given
    official = tmp_path / "mae_visualize_vit_tiny.pth"
    torch.save({"model": tiny.sd}, official)
    with pytest.raises(ValueError, match="attention heads"):
        load(official)
    model = load(official, num_heads=2, decoder_num_heads=2)
    assert_weights(model, tiny.sd)
    assert [b.attn.num_heads for b in (*model.blocks, *model.decoder_blocks)] == [2, 2, 2]
    assert not model.norm_pix_loss and model.data_mean == (0.5,) and not model.data_stats_known
    import warnings

    with warnings.catch_warnings():  # said by the caller: no warning that the file is read as raw pixels
        warnings.filterwarnings("error", message=".*pixel target.*")
        assert load(official, num_heads=2, decoder_num_heads=2, norm_pix_loss=True).norm_pix_loss
    # Hugging Face ViTMAEForPreTraining folder (config.json + model.safetensors + preprocessor_config.json)
    pytest.importorskip("transformers")
    assert main(["convert", "--init", str(tiny.ckpt), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
    model = load(tmp_path / "hf")
    assert isinstance(model, MaskedAutoencoderViT) and model.norm_pix_loss
    assert_weights(model, tiny.sd)
    assert model.data_mean == pytest.approx(tuple(tiny.meta["mean"]))
    # ... and back: fastmae -> hf -> fastmae through the CLI keeps every weight
    assert main(["convert", "--init", str(tmp_path / "hf"), "--output", str(tmp_path / "back"), "--to", "fastmae"]) == 0
    sd, meta = read_file(tmp_path / "back.safetensors")
    assert meta["kind"] == "mae" and meta["model_kwargs"]["norm_pix_loss"] is True
    assert sd.keys() == tiny.sd.keys() and all(torch.equal(sd[k], tiny.sd[k]) for k in sd)


def test_load_encoder_only_and_visualize_refuses_it(tiny, tmp_path, capsys):
    enc = mae_encoder(tiny.sd)
    path = tmp_path / "mae_pretrain_vit_base.pth"  # named like the official encoder-only release
    torch.save({"model": enc}, path)
    model = load(path, num_heads=2)  # not in the weights; 32 wide is not a standard width
    assert type(model) is VisionTransformer and model.num_classes == 0 and model.global_pool == "token"
    assert_weights(model, enc)
    # the encoder as a cls-token ViT gives the MAE's own features
    mae = load(tiny.run)
    x = images()
    for pool in ("avg", "token", "dense"):
        torch.testing.assert_close(encode(model, x, pool), encode(mae, x, pool))

    with pytest.raises(ValueError) as e:
        require_decoder(model, path)
    msg = str(e.value)
    assert "no MAE decoder" in msg and "'mask_token'" in msg and "8 tensors plus 12 per decoder block" in msg
    assert "mae_visualize_vit_base.pth" in msg and "mae_pretrain_vit_base_full.pth" in msg
    with pytest.raises(ValueError, match="decoder_embed.weight"):
        require_decoder(enc, path)
    assert require_decoder(tiny.sd) is tiny.sd and require_decoder(mae) is mae

    out = tmp_path / "fig.png"
    assert main(["visualize", "--init", str(path), "--data.path", str(tiny.data), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no MAE decoder" in err and "'mask_token'" in err and "mae_visualize_vit_base.pth" in err
    assert not out.exists()


def test_load_variant_names_and_errors(tmp_path):
    mae = load("mae_vit_tiny_patch4")
    assert isinstance(mae, MaskedAutoencoderViT) and not mae.training and mae.data_mean == (0.485, 0.456, 0.406)
    vit = load("vit_tiny_patch4")
    assert isinstance(vit, VisionTransformer) and vit.num_classes == 1000
    with pytest.raises(FileNotFoundError, match="not a variant name.*mae_vit_base_patch16"):
        load("mae_vit_nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without training checkpoints"):
        load(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------
# reconstruct and encode

def test_reconstruct_norm_pix_pastes_visible_patches_exactly(tiny):
    model = load(tiny.run)
    assert model.norm_pix_loss
    x = images(4)
    p = reconstruct(model, x, 0.75, seed=3, mean=model.data_mean, std=model.data_std)
    visible = (1 - p["mask"]).bool()  # (B, L)
    orig, pasted, rec = (patchify(p[k], model.patch_size) for k in ("original", "reconstruction + visible",
                                                                      "reconstruction"))
    assert torch.equal(pasted[visible], orig[visible])  # exactly, not approximately
    assert torch.equal(pasted[~visible], rec[~visible])
    assert (p["mask"].sum(1) == 49 - int(49 * 0.25)).all()  # K = int(L * (1 - ratio)) patches kept
    assert torch.isfinite(p["loss"]) and p["loss"].ndim == 0
    same = reconstruct(model, x, 0.75, seed=3, mean=model.data_mean, std=model.data_std)
    other = reconstruct(model, x, 0.75, seed=4, mean=model.data_mean, std=model.data_std)
    assert torch.equal(same["mask"], p["mask"]) and not torch.equal(other["mask"], p["mask"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        reconstruct(model, x, 1.0)


@pytest.mark.parametrize("make", ["mae", "vit_token", "vit_avg"])
def test_encode_shapes(make):
    if make == "mae":
        model = MaskedAutoencoderViT(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    else:
        model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=1,
                                  num_heads=2, global_pool=make.split("_")[1])
    x = torch.randn(2, 1, 28, 28)
    assert encode(model, x, "avg").shape == (2, 32)
    assert encode(model, x, "token").shape == (2, 32)
    assert encode(model, x, "dense").shape == (2, 32, 7, 7)
    if make != "mae":  # the pool a classifier was trained with gives exactly what its head sees
        torch.testing.assert_close(encode(model, x, model.global_pool),
                                   model.forward_head(model.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="pool must be"):
        encode(model, x, "max")


# ---------------------------------------------------------------------------------------------------
# fastmae visualize

def viz(tiny, out, *extra) -> list[str]:
    return ["visualize", "--init", str(tiny.run), "--data.path", str(tiny.data), "--output", str(out),
            *extra]


def test_visualize_grid_from_dataset_and_seeds(tiny, tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(viz(tiny, a, "--num", "3")) == 0
    assert str(a) in capsys.readouterr().out
    with Image.open(a) as im:
        assert im.size == grid_size(3) and im.mode == "RGB"
    assert main(viz(tiny, b, "--num", "3")) == 0
    assert a.read_bytes() == b.read_bytes()  # same seed, same mask, same bytes
    assert main(viz(tiny, c, "--num", "3", "--run.seed", "1")) == 0
    assert a.read_bytes() != c.read_bytes()
    # only the masked and reconstruction columns change with the seed; the originals are the same
    with Image.open(a) as ia, Image.open(c) as ic:
        ia, ic = np.asarray(ia), np.asarray(ic)
    col = slice(PAD, PAD + SIDE)
    assert np.array_equal(ia[HEAD:, col], ic[HEAD:, col])
    masked = slice(PAD + (SIDE + PAD), 2 * (SIDE + PAD))
    assert not np.array_equal(ia[HEAD:, masked], ic[HEAD:, masked])
    # the default --num 8 takes 8 of the 16 test samples
    assert main(viz(tiny, tmp_path / "d.png")) == 0
    with Image.open(tmp_path / "d.png") as im:
        assert im.size == grid_size(8)


def test_visualize_per_image_from_dataset(tiny, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(viz(tiny, out, "--num", "2", "--per_image")) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["sample-0000.png", "sample-0001.png"]
    printed = capsys.readouterr().out
    assert all(str(out / f) in printed for f in files)
    with Image.open(out / files[0]) as im:
        assert im.size == grid_size(1)


def test_visualize_image_files_mixed_sizes_and_modes(tiny, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 20), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8), "RGB").save(folder / "sub" / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (17, 50, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8), "RGB").convert("P").save(tmp_path / "pal.png")
    out = tmp_path / "figs"
    args = viz(tiny, out, "--images", str(folder), str(tmp_path / "pal.png"))
    assert main(args + ["--per_image"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grey.png", "pal.png", "rgb.png", "rgba.png"]
    grid = tmp_path / "grid.png"
    assert main(viz(tiny, grid, "--images", str(folder), str(tmp_path / "pal.png"))) == 0
    with Image.open(grid) as im:
        assert im.size == grid_size(4)
    capsys.readouterr()
    assert main(viz(tiny, tmp_path / "g2.png", "--images", str(tmp_path / "missing.png"))) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    # an earlier figure is not replaced unless asked: the grid, and each per-image PNG of the same name
    before = grid.read_bytes(), {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(viz(tiny, grid, "--images", str(folder / "grey.png"))) == 2
    assert f"{grid} holds an earlier run's output; pass another --output" in capsys.readouterr().err
    assert main(args + ["--per_image", "--model.mask_ratio", "0.5"]) == 2
    assert "holds an earlier run's output" in capsys.readouterr().err
    assert (grid.read_bytes(), {p.name: p.read_bytes() for p in out.iterdir()}) == before
    assert main(viz(tiny, grid, "--images", str(folder / "grey.png"), "--overwrite")) == 0
    with Image.open(grid) as im:
        assert im.size == grid_size(1)


def test_visualize_rejects_bad_mask_ratio(tiny, tmp_path, capsys):
    for ratio in ("1.0", "-0.1"):
        assert main(viz(tiny, tmp_path / "x.png", "--model.mask_ratio", ratio)) == 2
        assert "--model.mask_ratio must be in [0, 1)" in capsys.readouterr().err
    assert main(viz(tiny, tmp_path / "x.png", "--model.mask_ratio", "0", "--num", "1")) == 0


# ---------------------------------------------------------------------------------------------------
# The demo notebook

@pytest.mark.slow
def test_demo_notebook_runs(tiny, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(REPO / "examples" / "demo.ipynb", as_version=4)
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), "the committed notebook must not store outputs"
    out = tmp_path / "demo.png"
    monkeypatch.setenv("FASTMAE_DEMO_CKPT", str(tiny.run))
    monkeypatch.setenv("FASTMAE_DEMO_DATA", str(tiny.data))
    monkeypatch.setenv("FASTMAE_DEMO_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "loss" in text and "saved" in text, text
    assert out.stat().st_size > 0
    assert time.perf_counter() - t0 < 60
