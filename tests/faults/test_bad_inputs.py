"""Bad input fails early with one line that names the problem and the fix: flags, image files, paths."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.cli import main
from fastmae.commands.convert import ConvertConfig
from fastmae.commands.finetune import FinetuneConfig
from fastmae.commands.knn import KnnConfig
from fastmae.commands.linprobe import LinprobeConfig
from fastmae.commands.pretrain import PretrainConfig
from fastmae.commands.visualize import VisualizeConfig
from fastmae.config import DataConfig, OptimConfig, RunConfig, validate
from fastmae.data import UnreadableImageError, build_loader, decode_image, load_image
from fastmae.data import sources as D
from fastmae.train import trainer
from fastmae.weights.checkpoint import safe_join
from fastmae.weights.convert import read_file
from tests.helpers.cli import make_fmnist, tiny_args

REPO = Path(__file__).resolve().parents[2]

# (extra flags for a tiny pretraining run, text the error must contain): each fails before any work starts.
BAD_FLAGS = [
    (["--optim.epochs", "0"], "--optim.epochs must be >= 1, got 0"),
    (["--optim.batch_size", "-4"], "--optim.batch_size must be >= 1, got -4"),
    (["--optim.accum_iter", "0"], "--optim.accum_iter must be >= 1"),
    (["--optim.blr", "nan"], "--optim.blr must be > 0, got nan"),
    (["--optim.blr", "0"], "--optim.blr must be > 0"),
    (["--optim.lr", "-1"], "--optim.lr must be >= 0"),
    (["--optim.lr", "1e-4", "--optim.min_lr", "1e-3"], "--optim.min_lr must be <= --optim.lr"),
    (["--optim.weight_decay", "-0.05"], "--optim.weight_decay must be >= 0"),
    (["--optim.warmup_epochs", "inf"], "--optim.warmup_epochs must be >= 0, got inf"),
    (["--optim.betas", "0.9", "1.5"], "--optim.betas must be all in [0, 1)"),
    (["--model.mask_ratio", "1.0"], "--model.mask_ratio must be in (0, 1)"),
    (["--model.mask_ratio", "-0.1"], "--model.mask_ratio must be in (0, 1)"),
    (["--model.img_size", "30", "30"], "--model.img_size must be a multiple of"),
    (["--model.img_size", "0", "28"], "--model.img_size must be two positive integers"),
    (["--model.name", "mae_vit_gigantic"], "--model.name"),
    (["--data.num_workers", "-1"], "--data.num_workers must be >= 0"),
    (["--data.crop_scale", "0.8", "0.2"], "--data.crop_scale must be (min, max) with 0 < min <= max <= 1"),
    (["--data.std", "0"], "--data.std must be all > 0"),
    (["--data.limit", "-5"], "--data.limit must be >= 0"),
    (["--run.save_every", "0"], "--run.save_every must be >= 1"),
    (["--run.dist_timeout", "0"], "--run.dist_timeout must be > 0"),
    (["--knn_every", "-2"], "--knn_every must be >= -1"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_pretrain_flag_is_refused_before_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main([*tiny_args(tmp_path / "no-data-needed", out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1  # one line, no traceback
    assert not out.exists()  # refused before the output folder (or the data) was touched


BAD_OTHER = [
    (["finetune", "--init", "random", "--layer_decay", "0"], "--layer_decay must be in (0, 1]"),
    (["finetune", "--init", "random", "--model.drop_path", "1.0"], "--model.drop_path must be in [0, 1)"),
    (["finetune", "--init", "random", "--aug.smoothing", "-0.1"], "--aug.smoothing must be in [0, 1)"),
    (["finetune", "--init", "random", "--aug.mix_prob", "2"], "--aug.mix_prob must be in [0, 1]"),
    (["finetune", "--init", "random", "--aug.randaug_magnitude", "11"], "--aug.randaug_magnitude must be in [0, 10]"),
    (["knn", "--init", "random", "--knn.k", "0"], "--knn.k must be >= 1, got 0"),
    (["knn", "--init", "random", "--knn.temperature", "0"], "--knn.temperature must be > 0"),
    (["linprobe", "--init", "random", "--optim.epochs", "0"], "--optim.epochs must be >= 1"),
    (["knn", "--init", "random", "--model.img_size", "-4", "4"], "--model.img_size must be two positive integers"),
    (["linprobe", "--init", "random", "--model.depth", "-1"], "--model.depth must be >= 0"),
    (["embed", "--init", "random", "--model.num_heads", "-2"], "--model.num_heads must be >= 0"),
    (["segment", "--init", "random", "--model.drop_path", "1.5"], "--model.drop_path must be in [0, 1)"),
    (["segment", "--init", "random", "--model.name", "vit_nope"], "--model.name:"),
    (["embed", "--init", "random", "--data.source", "unlabelled"], "needs evaluation data, which --data.source "
     "unlabelled has only with --data.eval_path (or --data.holdout); pass one, or --embed.split train"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OTHER, ids=[" ".join(a) for a, _ in BAD_OTHER])
def test_bad_evaluation_flag_is_refused(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main([*argv, "--run.output_dir", str(out), "--data.path", str(tmp_path / "nothing")]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


PARSE_CASES = [
    (["pretrain", "--optim.epochs", "abc"], "--optim.epochs takes an integer, got 'abc'; see `fastmae pretrain --help`"),
    (["pretrain", "--optim.lr=abc"], "--optim.lr takes a number, got 'abc'"),
    (["pretrain", "--optim.epochs"], "Missing value for argument '--optim.epochs': it takes 1 value (INT), got 0"),
    (["pretrain", "--model.img_size", "64"], "'--model.img_size': it takes 2 values (INT INT), got 1: 64"),
    (["pretrain", "--run.precison", "fp32"], "unrecognized option --run.precison; did you mean --run.precision?"),
    (["pretrain", "--run.precision", "bf17"], "invalid choice 'bf17' for argument '--run.precision'. Expected one of"),
    (["pretrian"], "unknown command 'pretrian'; did you mean pretrain? available subcommands: pretrain, finetune"),
    ([], "no command given; available subcommands: pretrain, finetune"),
    (["convert"], "missing required --init, --output; see `fastmae convert --help`"),
    (["segment", "--head", "nope"], "invalid choice 'nope' for argument '--head'"),
    (["segment", "--finetune=1"], "--finetune takes no value, got '1'; give it alone to switch it on"),
    (["knn", "--model.drop_path", "0.1"], "--model.drop_path (finetune, segment, detect, pose)"),
    (["finetune", "--recipe", "fmnist-small", "--optim.epoch", "3"], "did you mean --optim.epochs?"),
    (["pretrain", "--data.hflip", "3"], "unexpected argument '3' after --data.hflip, which takes no value"),
    (["pretrain", "extra"], "unexpected argument 'extra': fastmae pretrain takes --flags only"),
    (["visualize", "--init", "x", "--model.norm_pix_loss", "maybe"], "invalid choice 'maybe' for argument '--model.norm_pix_loss'"),
    (["bench", "--bench.tasks", "pretrain", "dta"], "invalid choice 'dta' for argument '--bench.tasks'"),
]


@pytest.mark.parametrize(("argv", "message"), PARSE_CASES, ids=[" ".join(a) for a, _ in PARSE_CASES])
def test_malformed_command_line_is_one_line(capsys, argv, message):
    """A malformed command line is one `fastmae: error:` line: the flag, the problem, the fix (checked before tyro)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_validate_accepts_every_default():
    for cls in (PretrainConfig, FinetuneConfig, LinprobeConfig, KnnConfig):
        validate(cls())
    validate(VisualizeConfig(init="x.pt"))
    validate(ConvertConfig(init="a", output="b"))


def test_warmup_longer_than_training_is_allowed():
    """A one-epoch try of the fine-tuning recipe (warmup 5) must not need a second flag."""
    validate(OptimConfig(epochs=1, warmup_epochs=5))


def test_dist_timeout_reaches_the_process_group(monkeypatch, tmp_path):
    seen = {}

    def fake_init(device_type, timeout_s):
        seen["timeout"] = timeout_s
        from fastmae.train.dist import DistInfo

        return DistInfo()

    monkeypatch.setattr(trainer, "init_distributed", fake_init)
    cfg = PretrainConfig(run=RunConfig(output_dir=str(tmp_path / "o"), dist_timeout=42.0, device="cpu"))
    trainer.setup(cfg.run, cfg)
    assert seen == {"timeout": 42.0}


# ---------------------------------------------------------------------------------------------
# Image files: what is wrong with a file, said plainly, from the main process even with workers.

def test_pixel_limit_refuses_large_images_and_can_be_raised(tmp_path):
    Image.new("RGB", (120, 100), (10, 20, 30)).save(tmp_path / "big.png")
    with pytest.raises(UnreadableImageError, match=r"too large to decode safely.*--data\.max_image_pixels"):
        decode_image(tmp_path / "big.png", 3, max_image_pixels=5000)
    x = decode_image(tmp_path / "big.png", 3, max_image_pixels=12000)  # exactly its 12,000 pixels: allowed
    assert x.shape == (3, 100, 120)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global limit is restored after the decode


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_file_in_a_worker_is_one_clear_error(tmp_path, workers):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i, i, i)).save(root / f"ok{i}.png")
    Image.new("RGB", (200, 200)).save(root / "huge.png")
    cfg = DataConfig(source="unlabelled", path=str(root), num_workers=workers, max_image_pixels=1000)
    with pytest.raises(UnreadableImageError, match=r"huge\.png is too large") as info:
        list(build_loader(cfg, "train", (8, 8), 4, train=False))
    assert "Traceback" not in str(info.value)  # not a worker's wrapped traceback

    skip = DataConfig(source="unlabelled", path=str(root), num_workers=workers, max_image_pixels=1000,
                      skip_corrupt=True)
    ld = build_loader(skip, "train", (8, 8), 4, train=False)
    assert sum(len(y) for _, y in ld) == 4 and [p.rsplit("/", 1)[1] for p in ld.skipped] == ["huge.png"]


def test_pretrain_on_a_folder_of_unreadable_files_stops_with_the_file_name(tmp_path, capsys):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_text("text, not JPEG")
    args = tiny_args(tmp_path, tmp_path / "run")
    args[args.index("--data.path") + 1] = str(root)
    assert main([*args, "--data.source", "unlabelled", "--knn_every", "-1", "--data.num_workers", "0",
                 "--model.img_size", "8", "8", "--optim.batch_size", "1"]) == 2
    err = capsys.readouterr().err
    assert "a.jpg" in err and "--data.skip_corrupt" in err


# ---------------------------------------------------------------------------------------------
# Names that come from users or from files never reach outside their folder.

@pytest.mark.parametrize("name", ["../escape.png", "/etc/passwd", "a/../../b", "", "."])
def test_safe_join_refuses_names_outside_the_folder(tmp_path, name):
    with pytest.raises(ValueError, match="outside the folder"):
        safe_join(tmp_path, name)


def test_safe_join_allows_nested_names(tmp_path):
    assert safe_join(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    assert safe_join(tmp_path, "x..y.png") == tmp_path / "x..y.png"  # '..' inside a name is fine


def test_hf_shard_index_pointing_outside_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    torch.save({"w": torch.ones(1)}, secret)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.bin"}}))
    with pytest.raises(ValueError, match=r"refusing shard named in .*'\.\./secret\.bin'"):
        read_file(model)



# ---------------------------------------------------------------------------------------------
# The table: one messy file each, into a model of `channels` channels at 16x16. Expected: the
# (C, H, W) it becomes, or a regex the error must match (naming the file and the fix).

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _rgb(w: int = 40, h: int = 30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _palette_gif() -> bytes:
    buf = io.BytesIO()
    _rgb().convert("P").save(buf, "GIF")
    return buf.getvalue()


def _exif_rotated() -> bytes:
    img = _rgb(40, 20)
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 20 wide, 40 high
    return _jpeg(img, exif=exif)


SKIP_HINT = r".*--data\.skip_corrupt"
FILE_CASES: list[tuple[str, str, Callable[[], bytes], int, tuple[int, int, int] | str]] = [
    ("zero-byte file", "empty.jpg", lambda: b"", 3, r"empty\.jpg: the file is empty \(0 bytes\)" + SKIP_HINT),
    ("truncated JPEG", "cut.jpg", lambda: _jpeg(_rgb(64, 64))[:300], 3, r"cannot read image .*cut\.jpg" + SKIP_HINT),
    ("truncated PNG", "cut.png", lambda: _png(_rgb(64, 64))[:200], 3, r"cannot read image .*cut\.png" + SKIP_HINT),
    ("text named .jpg", "text.jpg", lambda: b"hello, I am not a JPEG", 3,
     r"text\.jpg: not an image in a format Pillow reads" + SKIP_HINT),
    ("CMYK into RGB", "cmyk.jpg", lambda: _jpeg(Image.new("CMYK", (33, 21), (10, 200, 30, 40))), 3, (3, 16, 16)),
    ("RGBA into RGB", "rgba.png", lambda: _png(_rgb().convert("RGBA")), 3, (3, 16, 16)),
    ("16-bit grey into RGB", "deep.png",
     lambda: _png(Image.fromarray((np.arange(600, dtype=np.uint16) * 100).reshape(20, 30))), 3, (3, 16, 16)),
    ("palette into RGB", "pal.gif", _palette_gif, 3, (3, 16, 16)),
    ("grayscale into RGB", "grey.png", lambda: _png(_rgb().convert("L")), 3, (3, 16, 16)),
    ("RGB into 1 channel", "rgb.png", lambda: _png(_rgb()), 1, (1, 16, 16)),
    ("RGBA into 2 channels", "rgba2.png", lambda: _png(_rgb().convert("RGBA")), 2,
     r"rgba2\.png.*expects 2 channels"),
    ("smaller than the crop", "tiny.png", lambda: _png(_rgb(5, 3)), 3, (3, 16, 16)),
    ("over the pixel limit", "huge.png", lambda: _png(Image.new("L", (300, 300))), 1,
     r"huge\.png is too large to decode safely.*--data\.max_image_pixels"),
    ("EXIF rotation", "rot.jpg", _exif_rotated, 3, (3, 16, 16)),
]


@pytest.mark.parametrize(("case", "name", "make", "channels", "expected"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
@pytest.mark.parametrize("train", [False, True])
def test_messy_image_file(tmp_path, case, name, make, channels, expected, train):
    path = tmp_path / name
    path.write_bytes(make())
    def load() -> torch.Tensor:
        return load_image(path, (16, 16), channels, [0.5] * channels, [0.25] * channels, train=train,
                          generator=torch.Generator().manual_seed(0), max_image_pixels=50_000)

    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            load()
    else:
        x = load()
        assert x.shape == expected and torch.isfinite(x).all()


def _class_folder_without_images(root: Path) -> DataConfig:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
    _rgb().save(root / "cat" / "a.png")
    (root / "dog" / "notes.txt").write_text("no pictures here")
    return DataConfig(source="folder", path=str(root))


FOLDER_CASES: list[tuple[str, Callable[[Path], DataConfig], type, str]] = [
    ("empty folder", lambda r: (r.mkdir(), DataConfig(source="unlabelled", path=str(r)))[1], ValueError,
     r"no images found under .*add images there or pass `--data\.path DIR`"),
    ("missing path", lambda r: DataConfig(source="folder", path=str(r / "nope")), FileNotFoundError,
     r"nope.*--data\.path"),
    ("folder without permission", lambda r: (r.mkdir(), _rgb().save(r / "a.png"),
                                             DataConfig(source="unlabelled", path=str(r)))[2],
     PermissionError, r"cannot read folder .*\(permission denied\)"),
    ("class folder with no images", _class_folder_without_images, ValueError,
     r"class folder .*dog contains no images"),
]


@pytest.mark.parametrize(("case", "make", "error", "message"), FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_messy_folder(tmp_path, monkeypatch, case, make, error, message):
    cfg = make(tmp_path / "data")
    if case == "folder without permission":  # tests may run as root, which reads anything
        monkeypatch.setattr(D.os, "access", lambda *a, **k: False)
    with pytest.raises(error, match=message):
        build_loader(cfg, "train", (8, 8), 2, train=True)


def test_readme_states_the_number_of_bad_input_cases():
    """The README's count is the size of the tables above (files, folders, flags)."""
    n = len(FILE_CASES) + len(FOLDER_CASES) + len(BAD_FLAGS) + len(BAD_OTHER) + len(PARSE_CASES)
    found = re.search(r"(\d+) bad-input cases", (REPO / "README.md").read_text())
    assert found and int(found.group(1)) == n, f"README should say '{n} bad-input cases'"


@pytest.mark.slow
def test_help_into_a_closed_pipe_ends_quietly():
    """`fastmae finetune --help | head`: the reader leaves early; no traceback, a plain non-zero exit."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        res = subprocess.run([sys.executable, "-m", "fastmae", "finetune", "--help"], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(w)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr


@pytest.mark.parametrize("flags", [["--data.mean", "0.1", "0.2"], ["--data.std", "0.3", "0.3", "0.3"]])
def test_normalisation_values_must_match_the_channels(tmp_path, capsys, flags):
    """Fashion-MNIST is one channel: 2 means or 3 stds cannot apply (Loader's check_norm, before any batch)."""
    data = make_fmnist(tmp_path)
    assert main([*tiny_args(data, tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    expected = f"--data.{flags[0][7:]} has {len(flags) - 1} values but the model takes 1 channel; give one per channel"
    assert expected in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linprobe", "knn", "visualize", "convert", "bench", "embed",
                                     "segment", "detect"])
def test_the_flag_table_is_the_help(capsys, command):
    """fastmae.flags models tyro's flag names: every flag it knows is in `--help`, and every flag `--help` shows is
    known to it (a renamed field or a new type that tyro spells differently fails here)."""
    import re

    from fastmae.cli import COMMANDS
    from fastmae.flags import command_flags

    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = set(re.findall(r"(--[a-z_]+(?:\.[a-z_]+)*)", capsys.readouterr().out)) - {"--help"}
    known = set(command_flags(COMMANDS[command][0]))
    shown -= {s for s in shown if any(k.startswith(s + ".") for k in known)}  # '--data.*' in a help text
    assert known == shown, (sorted(known - shown), sorted(shown - known))


@pytest.mark.parametrize(("value", "shows"), [("", False), ("0", False), ("false", False), ("no", False),
                                              ("1", True), ("true", True), ("YES", True)])
def test_fastmae_debug_zero_means_off(monkeypatch, capsys, tmp_path, value, shows):
    """FASTMAE_DEBUG=0 keeps the one-line error (it was read as on: any non-empty value showed the traceback)."""
    monkeypatch.setenv("FASTMAE_DEBUG", value)
    argv = ["knn", "--init", str(tmp_path / "missing.pt"), "--run.output_dir", str(tmp_path / "o")]
    if shows:
        with pytest.raises((ValueError, FileNotFoundError)):
            main(argv)
    else:
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith("fastmae: error: ")


def test_the_variant_help_names_every_variant():
    """--model.name's help spells the variant tables out (they appeared only in an error before)."""
    import inspect
    import itertools

    from fastmae.config import EncoderConfig, MAEModelConfig
    from fastmae.models.mae import MAE_VARIANTS
    from fastmae.models.vit import VARIANTS

    def named(cls) -> set[str]:
        text = " ".join(inspect.getsource(cls).split())
        doc = text[text.index('name: str'):].split('"""')[1]
        out = set()
        for pattern in re.findall(r"[a-z_]*\{[^ ]*|(?:[a-z]+_)?vit_[a-z0-9_]+", doc):
            parts = re.split(r"\{([^}]*)\}", pattern.rstrip(",.)"))
            choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
            out |= {"".join(c) for c in itertools.product(*choices)}
        return out

    assert set(MAE_VARIANTS) <= named(MAEModelConfig) and "mae_vit_tiny_d6_patch4" in named(MAEModelConfig)
    assert set(VARIANTS) <= named(EncoderConfig) and "vit_tiny_d6_patch4" in named(EncoderConfig)
