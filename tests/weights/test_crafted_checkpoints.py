"""Crafted or damaged checkpoint files: refused with one line before anything is allocated from their numbers."""

from __future__ import annotations

import json
import re

import pytest
import torch

import fastmae
from fastmae.cli import main
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.weights import convert as cv
from tests.conftest import TINY_MAE


@pytest.fixture
def export(tmp_path):
    """A tiny MAE exported as X.safetensors + X.json (fastmae convert --to fastmae)."""
    mae = MaskedAutoencoderViT(**TINY_MAE)
    path = cv.save_fastmae(tmp_path / "mae", mae.state_dict(), {"kind": "mae", "model_kwargs": dict(TINY_MAE)})
    return path


@pytest.fixture
def hf_dir(tmp_path):
    """The same tiny MAE as a Hugging Face ViTMAEForPreTraining folder."""
    pytest.importorskip("transformers")
    mae = MaskedAutoencoderViT(**TINY_MAE)
    return cv.save_hf(tmp_path / "hf", *cv.fastmae_to_hf_mae(mae.state_dict(), dict(TINY_MAE), style="legacy"))


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_sidecar_sizes_that_are_not_the_weights_are_refused_before_allocation(export):
    side = export.with_suffix(".json")
    data = json.loads(side.read_text())
    data["model_kwargs"]["embed_dim"] = 120000  # 172.8 GB of attention weights if believed
    side.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"does not belong to these weights: embed_dim=120000 \(the weights: 64\)"):
        fastmae.load(export)
    data["model_kwargs"].update(embed_dim=64, depth=3000000)
    side.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"depth=3000000 \(the weights: 2\)"):
        fastmae.load(export)


def test_hf_config_with_absurd_sizes_is_refused(hf_dir):
    cfg = hf_dir / "config.json"
    _edit_json(cfg, num_hidden_layers=3000000)
    with pytest.raises(ValueError, match="num_hidden_layers=3000000 but the weights have 2 blocks"):
        fastmae.load(hf_dir)
    _edit_json(cfg, num_hidden_layers=2, image_size=400000)
    with pytest.raises(ValueError, match=r"image_size must be an integer \(or two\) in \[1, 65536\], got 400000"):
        fastmae.load(hf_dir)
    _edit_json(cfg, image_size=32, hidden_size="64")
    with pytest.raises(ValueError, match="hidden_size must be a positive integer, got '64'"):
        fastmae.load(hf_dir)


def test_hf_config_that_is_not_an_object_and_index_without_weight_map(hf_dir):
    (hf_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        fastmae.load(hf_dir)
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        fastmae.load(hf_dir)


def test_shard_index_without_weight_map(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="has no 'weight_map'"):
        cv.read_file(d)


def test_corrupt_safetensors_header_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**15).to_bytes(8, "little") + b"{}")  # a header length far beyond the file
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        cv.read_file(bad)
    assert main(["convert", "--init", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tensor_of_the_wrong_rank_is_named(tmp_path):
    sd = MaskedAutoencoderViT(**TINY_MAE).state_dict()
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].flatten(1)  # (D, C*p*p)
    torch.save({"model": sd}, tmp_path / "flat.pth")
    with pytest.raises(ValueError, match=r"'patch_embed.proj.weight' has 2 dimensions"):
        fastmae.load(tmp_path / "flat.pth")


def test_fastmae_weights_without_their_json_say_what_was_guessed(export):
    export.with_suffix(".json").unlink()
    with pytest.warns(RuntimeWarning, match="guessed data mean .* norm_pix_loss False"):
        model = fastmae.load(export)
    assert model.data_stats_known is False


def test_a_model_too_large_to_allocate_is_one_line(tmp_path, capsys):
    code = main(["pretrain", "--model.embed_dim", "400000", "--model.num_heads", "4", "--model.depth", "1",
                 "--run.output_dir", str(tmp_path / "run"), "--data.limit", "8", "--run.precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 2 and "out of memory" in err and "--optim.batch_size" in err, err


@pytest.mark.parametrize(("side", "message"), [
    ("[]", "holds a JSON list, not an object"),
    ('{"kind": "detector", "config": "x"}', "has 'config' as a JSON str, not an object"),
    ('{"kind": "vit", "model_kwargs": {"num_heads": "3"}}', "has model_kwargs num_heads = '3', not a whole number"),
    ('{"kind": "vit", "model_kwargs": {"bogus": 1}}', "names model_kwargs fastmae's models do not take: bogus"),
    ('{"mean": "0.5"}', "has 'mean' = '0.5', not a list of numbers"),
    ("{bad", "is not valid JSON"),
])
def test_a_malformed_metadata_file_is_named_not_a_traceback(tmp_path, side, message):
    """Issue #29: a sidecar of [] was silently ignored, 'config' as a string or a string num_heads were tracebacks."""
    from fastmae.models.vit import VisionTransformer
    from fastmae.weights.read import read_weights

    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                            global_pool="token")
    torch.save({"model": vit.state_dict()}, tmp_path / "w.pt")
    (tmp_path / "w.json").write_text(side)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        read_weights(tmp_path / "w.pt")
    assert "w.json" in str(e.value)
