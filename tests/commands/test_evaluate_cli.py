"""End-to-end `fastmae finetune | linprobe | knn` on tiny data, from a tiny pretraining run and from random init."""

from __future__ import annotations

import json

import pytest
import torch

from fastmae.cli import main
from fastmae.commands.finetune import ViTModelConfig
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.vit import VisionTransformer
from fastmae.weights.backbone import build_classifier, encoder_init
from fastmae.weights.read import Weights
from tests.helpers.cli import pretrain_tiny


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny 1-epoch MAE run on a tiny IDX dataset: (data folder, run folder)."""
    return pretrain_tiny(tmp_path_factory.mktemp("eval"))


TINY_VIT = ["--model.name", "vit_tiny_patch4", "--model.img_size", "28", "28", "--model.embed_dim", "32", "--model.depth", "2",
            "--model.num_heads", "2"]


def common(data, out) -> list[str]:
    return ["--data.path", str(data), "--run.output_dir", str(out), "--run.no_progress", "--run.precision", "fp32"]


def test_knn_from_pretrained_and_random(pretrained, tmp_path, capsys):
    data, run = pretrained
    assert main(["knn", "--init", str(run), *common(data, tmp_path / "k1")]) == 0
    res = json.loads((tmp_path / "k1" / "knn.json").read_text())
    assert 0 <= res["top1"] <= 100 and res["train"] == 96 and res["eval"] == 40
    assert res["pool"] == "tokens"  # auto on a 7x7 patch grid: every patch token
    assert "kNN" in capsys.readouterr().out
    assert main(["knn", "--init", str(run), "--model.global_pool", "avg", *common(data, tmp_path / "k3")]) == 0
    assert json.loads((tmp_path / "k3" / "knn.json").read_text())["pool"] == "avg"
    assert main(["knn", "--init", "random", *TINY_VIT, *common(data, tmp_path / "k2")]) == 0
    assert (tmp_path / "k2" / "knn.json").exists()
    capsys.readouterr()
    assert main(["knn", "--init", str(run), "--data.holdout", "16", *common(data, tmp_path / "k4")]) == 0
    res = json.loads((tmp_path / "k4" / "knn.json").read_text())
    assert (res["train"], res["eval"], res["holdout"]) == (80, 16, 16)  # scored on training images, not the test
    assert "on the 16 held-out training samples" in capsys.readouterr().out


def test_linprobe_cached_and_augmented(pretrained, tmp_path):
    data, run = pretrained
    args = ["linprobe", "--init", str(run), "--optim.epochs", "3", "--optim.warmup_epochs", "1",
            "--optim.batch_size", "32"]
    assert main(args + common(data, tmp_path / "lp")) == 0
    res = json.loads((tmp_path / "lp" / "linprobe.json").read_text())
    assert 0 <= res["top1"] <= 100 and res["augment"] is False and res["pool"] == "tokens"
    meta = json.loads(next((tmp_path / "lp").glob("checkpoint-*.json")).read_text())
    assert meta["dim"] == 49 * 32  # the head reads all 49 patch tokens of the 32-wide tiny encoder
    assert main(args + ["--augment"] + common(data, tmp_path / "lpa")) == 0
    res = json.loads((tmp_path / "lpa" / "linprobe.json").read_text())
    assert res["augment"] is True and 0 <= res["top1"] <= 100


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_second_evaluation_into_the_same_folder_keeps_the_first(pretrained, tmp_path, capsys):
    """knn / linprobe into a folder holding an earlier result stop before any work, naming it (result and fix); the
    first run's files are untouched. The overwrite flag replaces them, config.json included."""
    data, run = pretrained
    for cmd, flag, extra, result in (("knn", "--knn.overwrite", ["--knn.k", "5"], "knn.json"),
                                     ("linprobe", "--overwrite", ["--optim.epochs", "2", "--optim.batch_size", "32"],
                                      "linprobe.json")):
        out = tmp_path / cmd
        assert main([cmd, "--init", str(run), *extra, *common(data, out)]) == 0
        first, top1 = _files(out), json.loads((out / result).read_text())["top1"]
        capsys.readouterr()
        assert main([cmd, "--init", "random", *TINY_VIT, *extra, *common(data, out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out / result} holds an earlier run's output (top-1 {top1:.2f}% of {run})" in err[0]
        assert "--run.output_dir" in err[0] and flag in err[0]
        assert _files(out) == first
        assert main([cmd, "--init", "random", *TINY_VIT, *extra, flag, *common(data, out)]) == 0
        assert json.loads((out / result).read_text())["init"] == "random"
        assert json.loads((out / "config.json").read_text())["init"] == "random"  # the config of the result
        capsys.readouterr()
        fresh = tmp_path / f"{cmd}_failed"  # a run that fails after the checks writes nothing, config.json included
        assert main([cmd, "--init", str(run), "--data.source", "unlabelled", *extra, *common(data, fresh)]) == 2
        err = capsys.readouterr().err
        assert "no images found" in err, err  # found by the loader, after the run folder was set up
        assert not (fresh / "config.json").exists()


def test_finetune_from_pretrained_writes_best_and_last(pretrained, tmp_path):
    data, run = pretrained
    out = tmp_path / "ft"
    args = ["finetune", "--init", str(run), "--optim.epochs", "2", "--optim.warmup_epochs", "1",
            "--optim.batch_size", "32", "--run.save_every", "1", *common(data, out)]
    assert main(args) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["epochs_done"] == 2 and 0 <= res["best_top1"] <= 100
    assert (out / "best.pt").exists() and list(out.glob("checkpoint-*.pt"))
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("top1" in e for e in log if "epoch" in e)
    # the best checkpoint rebuilds a classifier that loads strictly
    meta = json.loads((out / "best.json").read_text())
    kw = meta["model_kwargs"]
    vit = VisionTransformer(**{**kw, "img_size": tuple(kw["img_size"])})
    vit.load_state_dict(torch.load(out / "best.pt", weights_only=True), strict=True)


def test_a_finished_finetune_run_again(pretrained, tmp_path, capsys):
    """The same command again reports the run's own last top-1 (no epoch runs: it was 'nan%'); another --init into
    the folder is refused (the checkpoint's weights would win while config.json said the new --init)."""
    data, run = pretrained
    out = tmp_path / "ft"
    args = ["finetune", "--init", str(run), "--optim.epochs", "1", "--optim.batch_size", "32", *common(data, out)]
    assert main(args) == 0
    first = json.loads((out / "finetune.json").read_text())
    config = (out / "config.json").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert f"last top-1 {first['top1']:.2f}%" in capsys.readouterr().out
    assert json.loads((out / "finetune.json").read_text())["top1"] == first["top1"]
    other = ["finetune", "--init", "random", *TINY_VIT, "--optim.epochs", "1", "--optim.batch_size", "32",
             *common(data, out)]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert f"that run started from --init {run}, this command gives --init random" in err and "--run.output_dir" in err
    assert (out / "config.json").read_text() == config


def test_finetune_from_random_init(pretrained, tmp_path):
    data, _ = pretrained
    args = ["finetune", "--init", "random", *TINY_VIT, "--optim.epochs", "1", "--optim.batch_size", "32",
            "--aug.randaug_ops", "0", "--aug.mixup", "0", "--aug.cutmix", "0", *common(data, tmp_path / "ftr")]
    assert main(args) == 0


def test_backbone_resamples_position_embeddings(pretrained):
    _, run = pretrained
    bb = encoder_init(str(run), ViTModelConfig())
    assert tuple(bb.model_kwargs["img_size"]) == (28, 28)
    vit = build_classifier(bb, ViTModelConfig(img_size=(36, 44)), num_classes=3, in_chans=1, global_pool="avg")
    assert vit.pos_embed.shape == (1, 1 + 9 * 11, 32)
    # copied weights are the checkpoint's; the cls slot of the position embedding is kept
    assert torch.equal(vit.blocks[0].attn.qkv.weight, bb.state_dict["blocks.0.attn.qkv.weight"])
    assert torch.equal(vit.pos_embed[:, :1], bb.state_dict["pos_embed"][:, :1])
    out = vit(torch.randn(2, 1, 36, 44))
    assert out.shape == (2, 3)


def test_backbone_refuses_mismatched_weights():
    mae = MaskedAutoencoderViT(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                               decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    state = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    bb = Weights("encoder", state, dict(img_size=(8, 8), patch_size=4, in_chans=1, embed_dim=16, depth=1,
                                       num_heads=2), source="test")
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight"):
        build_classifier(bb, ViTModelConfig(), num_classes=2, in_chans=1, global_pool="avg")


@pytest.mark.parametrize(("command", "offered", "absent"), [
    ("finetune", ["--model.drop_path", "--model.global_pool", "--model.img_size"], []),
    ("segment", ["--model.drop_path", "--model.img_size"], ["--model.global_pool"]),
    ("knn", ["--model.global_pool", "--model.img_size"], ["--model.drop_path"]),
    ("linprobe", ["--model.global_pool", "--model.img_size"], ["--model.drop_path"]),
    ("embed", ["--model.img_size", "--model.name"], ["--model.drop_path", "--model.global_pool"]),
])
def test_help_offers_only_model_flags_that_act(capsys, command, offered, absent):
    """A frozen encoder has no stochastic depth; segment and embed choose their own features (no --model.global_pool)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in offered), offered
    assert not any(flag in out for flag in absent), absent


@pytest.mark.parametrize(("source", "problem"), [("unlabelled", "needs labels: use a labelled source"),
                                               ("folder", "needs two or more classes, the data has one (shirts)")])
@pytest.mark.parametrize(("command", "name"), [("knn", "kNN"), ("linprobe", "a linear probe"),
                                               ("finetune", "fine-tuning")])
def test_classification_without_two_classes_is_refused(pretrained, tmp_path, capsys, command, name, source, problem):
    """No labels, or a single class folder (where every method scores 100%): one line, no result file."""
    from PIL import Image

    _, run = pretrained
    folder = tmp_path / "images" / "shirts"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.new("L", (28, 28), 20 * i).save(folder / f"{i}.png")
    out = tmp_path / "out"
    argv = [command, "--init", str(run), "--data.source", source, "--data.holdout", "4", "--data.num_workers", "0",
            *common(folder.parent, out)]
    assert main(argv) == 2
    assert f"{name} {problem}" in capsys.readouterr().err
    assert not (out / f"{command}.json").exists()


def test_finetune_into_a_pretraining_folder_is_refused(pretrained, tmp_path, capsys):
    """The output folder holds another command's checkpoints: named as such, and nothing in it changes."""
    import shutil

    data, run = pretrained
    folder = tmp_path / "pretrain_copy"
    shutil.copytree(run, folder)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    argv = ["finetune", "--init", str(folder), "--optim.epochs", "1", *common(data, folder)]
    assert main(argv) == 2
    assert f"{folder} holds a `fastmae pretrain` run" in capsys.readouterr().err  # before its checkpoint is read
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_convert_a_run_folder_and_never_overwrite(pretrained, tmp_path, capsys):
    """A run folder has a config.json too: it is still read as a run (its newest checkpoint), not as HF."""
    _, run = pretrained
    out = tmp_path / "export" / "mae"
    assert main(["convert", "--init", str(run), "--output", str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    meta = json.loads(out.with_name("mae.json").read_text())
    assert meta["kind"] == "mae" and meta["source"].endswith(".pt")
    before = out.with_name("mae.safetensors").read_bytes()
    assert main(["convert", "--init", str(run), "--output", str(out), "--to", "fastmae"]) == 2
    assert "mae.safetensors exists; fastmae convert does not overwrite files" in capsys.readouterr().err
    assert out.with_name("mae.safetensors").read_bytes() == before
