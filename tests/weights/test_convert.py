"""Checkpoint conversion: Hugging Face parity and round trips, official/timm identity, safety and errors."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

from fastmae.commands import convert as convert_cmd
from fastmae.commands.convert import ConvertConfig
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.pos_embed import sincos_2d
from fastmae.models.vit import VisionTransformer
from fastmae.weights import convert as cv

HF_MAE = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=2,
              decoder_num_attention_heads=4, decoder_intermediate_size=128, layer_norm_eps=1e-6)
HF_VIT = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=256, layer_norm_eps=1e-6)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (HF initialises some to zero), so each one matters."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _hf_mae(norm_pix_loss: bool = False, mask_ratio: float = 0.75):
    tf = pytest.importorskip("transformers")
    cfg = tf.ViTMAEConfig(**HF_MAE, norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio)
    return _perturbed(tf.ViTMAEForPreTraining(cfg))


def _hf_vit():
    tf = pytest.importorskip("transformers")
    return _perturbed(tf.ViTForImageClassification(tf.ViTConfig(**HF_VIT, num_labels=10)), seed=1)


def _equal_sd(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _official_kwargs(cfg: dict) -> dict:
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
            "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss")
    return {k: cfg[k] for k in keys}


def _vit_kwargs(cfg: dict, pool: str) -> dict:
    return dict(img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"], num_classes=10,
                embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"], global_pool=pool)


def _tiny() -> dict:
    """The fixture's MAE size."""
    return dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                decoder_depth=2, decoder_num_heads=4)


# ------------------------------------------------------------------ Hugging Face parity and round trips

@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_mae_parity_and_round_trip(norm_pix_loss):
    hf = _hf_mae(norm_pix_loss)
    hf_sd = hf.state_dict()
    sd, kw = cv.hf_mae_to_fastmae(hf_sd, hf.config)
    assert kw["norm_pix_loss"] is norm_pix_loss and kw["num_heads"] == 4 and kw["decoder_num_heads"] == 4
    m = MaskedAutoencoderViT(**kw).eval()
    m.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(3)
    imgs, noise = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, 64, generator=g)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = m(imgs, 0.75, noise=noise)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred, out.logits, atol=1e-5, rtol=0)
    assert torch.equal(mask, out.mask)
    back, config = cv.fastmae_to_hf_mae(sd, kw, mask_ratio=0.75)
    _equal_sd(back, hf_sd)
    assert config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu" and config.qkv_bias
    assert config.norm_pix_loss is norm_pix_loss and config.mask_ratio == 0.75
    assert config.intermediate_size == 256 and config.decoder_intermediate_size == 128


def test_hf_vit_classification_parity_and_round_trip():
    hf = _hf_vit()
    sd, kw = cv.hf_vit_to_fastmae(hf.state_dict(), hf.config)
    assert kw["global_pool"] == "token" and kw["num_classes"] == 10
    v = VisionTransformer(**kw).eval()
    v.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(v(x), hf(pixel_values=x).logits, atol=1e-5, rtol=0)
    back, config = cv.fastmae_to_hf_vit(sd, kw)
    _equal_sd(back, hf.state_dict())
    assert config.num_labels == 10 and config.layer_norm_eps == 1e-6


def test_hf_encoder_parity_and_round_trip():
    tf = pytest.importorskip("transformers")
    hf = _perturbed(tf.ViTMAEModel(tf.ViTMAEConfig(**HF_MAE, mask_ratio=0.0)), seed=2)
    assert cv.detect_format(hf.state_dict()) == "hf-vitmae-model"
    sd, kw = cv.hf_vit_to_fastmae(hf.state_dict(), hf.config)
    assert kw["num_classes"] == 0
    v = VisionTransformer(**kw).eval()
    v.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    noise = torch.arange(64.0).expand(2, 64)  # keeps every patch in order
    with torch.no_grad():
        torch.testing.assert_close(v.forward_features(x), hf(x, noise=noise).last_hidden_state,
                                   atol=1e-5, rtol=0)
    _equal_sd(cv.fastmae_to_hf_vit(sd, kw)[0], hf.state_dict())


def test_official_fixture_runs_in_hf(official):
    """official -> HF: the HF models reproduce the official loss, prediction and logits."""
    tf = pytest.importorskip("transformers")
    cfg = official["config"]
    hf_sd, config = cv.fastmae_to_hf_mae(official["mae_state_dict"], _official_kwargs(cfg), cfg["mask_ratio"])
    hf = tf.ViTMAEForPreTraining(config).eval()
    hf.load_state_dict(hf_sd, strict=True)
    with torch.no_grad():
        out = hf(pixel_values=official["imgs"], noise=official["noise"])
    torch.testing.assert_close(out.loss, official["loss"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, official["pred"], atol=1e-5, rtol=0)
    hf_sd, config = cv.fastmae_to_hf_vit(official["classifier_token"]["state_dict"], _vit_kwargs(cfg, "token"))
    hfv = tf.ViTForImageClassification(config).eval()
    hfv.load_state_dict(hf_sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hfv(official["imgs"]).logits, official["classifier_token"]["logits"],
                                   atol=1e-5, rtol=0)


def test_hf_layouts_all_read(tmp_path):
    """Legacy (Hub files), modular (transformers >= 5 in memory) and transformers 5.x save_pretrained files."""
    hf = _hf_mae()
    ref, kw = cv.hf_mae_to_fastmae(hf.state_dict(), hf.config)
    legacy, _ = cv.fastmae_to_hf_mae(ref, kw, style="legacy")
    assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
    assert "decoder.decoder_layers.1.output.dense.bias" in legacy
    modular, _ = cv.fastmae_to_hf_mae(ref, kw, style="modular")
    assert "vit.layers.1.attention.q_proj.weight" in modular and "decoder.decoder_layers.0.mlp.fc2.bias" in modular
    hf.save_pretrained(tmp_path / "saved")
    saved, config = cv.read_file(tmp_path / "saved")
    for hf_sd in (legacy, modular, saved):
        _equal_sd(cv.hf_mae_to_fastmae(hf_sd, config)[0], ref)
    _equal_sd(cv.hf_mae_to_fastmae(legacy)[0], ref)  # no config: inferred (heads from the width table)


def test_hf_missing_fixed_pos_embeds_are_rebuilt():
    pytest.importorskip("transformers")
    kw = _tiny()
    m = MaskedAutoencoderViT(**kw)
    hf_sd, config = cv.fastmae_to_hf_mae(m.state_dict(), kw, style="legacy")
    del hf_sd["vit.embeddings.position_embeddings"], hf_sd["decoder.decoder_pos_embed"]
    sd, _ = cv.hf_mae_to_fastmae(hf_sd, config)
    assert torch.equal(sd["pos_embed"], m.pos_embed) and torch.equal(sd["decoder_pos_embed"], m.decoder_pos_embed)
    # HF's own sin-cos builder (with its h/w rotation) equals fastmae's
    from transformers.models.vit_mae.modeling_vit_mae import (
        build_2d_sinusoidal_position_embedding as build,
    )
    pe = build(8, 8, 64, cls_token=True)
    assert torch.equal(torch.cat([pe[:, 32:], pe[:, :32]], dim=1), sincos_2d(8, 8, 64, cls_token=True))


def test_hf_layer_norm_eps_is_loaded_and_written_back():
    """HF's default layer_norm_eps is 1e-12 (fastmae's, the official MAE's, 1e-6): a native HF ViTMAE keeps its eps,
    so its outputs are HF's (the eps matters for a perturbed model: the tokens' variance is small)."""
    tf = pytest.importorskip("transformers")
    hf = tf.ViTMAEForPreTraining(tf.ViTMAEConfig(**{**HF_MAE, "layer_norm_eps": 1e-12}))
    hf.load_state_dict(_perturbed(hf).state_dict())
    hf.eval()
    sd, kw = cv.hf_mae_to_fastmae(hf.state_dict(), hf.config)
    assert kw["norm_eps"] == 1e-12
    m = MaskedAutoencoderViT(**kw).eval()
    m.load_state_dict(sd, strict=True)
    assert all(mod.eps == 1e-12 for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm))
    g = torch.Generator().manual_seed(3)
    imgs, noise = torch.randn(2, 3, 32, 32, generator=g) * 1e-4, torch.rand(2, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(m(imgs, 0.75, noise=noise)[1], hf(pixel_values=imgs, noise=noise).logits,
                                   atol=1e-5, rtol=0)
    assert cv.fastmae_to_hf_mae(sd, kw)[1].layer_norm_eps == 1e-12
    enc = tf.ViTMAEModel(hf.config)  # the encoder alone -> a fastmae encoder with that eps
    _, vit_kw = cv.hf_vit_to_fastmae(enc.state_dict(), enc.config)
    assert vit_kw["norm_eps"] == 1e-12 and VisionTransformer(**vit_kw).blocks[0].norm1.eps == 1e-12


# ------------------------------------------------------------------ official and timm

def test_official_and_timm_identity(official):
    cfg = official["config"]
    mae_sd = official["mae_state_dict"]
    assert cv.detect_format(mae_sd) == "fastmae-mae"
    kw = cv.infer_mae_kwargs(mae_sd, num_heads=4, decoder_num_heads=4)
    assert {k: kw[k] for k in _official_kwargs(cfg) if k != "norm_pix_loss"} == {
        k: v for k, v in _official_kwargs(cfg).items() if k != "norm_pix_loss"}
    cv.check_state_dict(mae_sd, "mae", kw)
    for key, pool in (("classifier_avg", "avg"), ("classifier_token", "token")):
        sd = official[key]["state_dict"]
        assert cv.detect_format(sd) == "fastmae-vit"
        assert cv.infer_vit_kwargs(sd, num_heads=4) == {**_vit_kwargs(cfg, pool), "mlp_ratio": 4.0}
        _equal_sd(cv.fastmae_to_timm(cv.timm_to_fastmae(sd)), sd)
    assert set(cv.fastmae_to_timm(mae_sd)) == set(cv.mae_encoder(mae_sd))
    with pytest.raises(ValueError, match="ls1"):
        cv.timm_to_fastmae({**official["classifier_avg"]["state_dict"], "blocks.0.ls1.gamma": torch.ones(64)})


def test_detect_format_and_unwrap(official):
    tf = pytest.importorskip("transformers")
    mae_sd = official["mae_state_dict"]
    enc = cv.mae_encoder(mae_sd)
    assert cv.detect_format(enc) == "fastmae-encoder"
    assert cv.detect_format({**enc, "reg_token": torch.zeros(1, 4, 64)}) == "timm-vit"
    assert cv.detect_format(_hf_mae().state_dict()) == "hf-vitmae-pretraining"
    legacy, _ = cv.fastmae_to_hf_mae(mae_sd, _official_kwargs(official["config"]), style="legacy")
    assert cv.detect_format(legacy) == "hf-vitmae-pretraining"
    assert cv.detect_format(_hf_vit().state_dict()) == "hf-vit-classification"
    assert cv.detect_format(tf.ViTMAEModel(tf.ViTMAEConfig(**HF_MAE)).state_dict()) == "hf-vitmae-model"
    with pytest.raises(ValueError, match="unrecognised"):
        cv.detect_format({"foo": torch.zeros(1)})
    ddp = {"module." + k: v for k, v in enc.items()}
    assert cv.unwrap_state_dict({"model": ddp, "epoch": 3}) == enc
    assert cv.unwrap_state_dict({"state_dict": enc}) == enc
    with pytest.raises(ValueError, match="top-level keys"):
        cv.unwrap_state_dict({"epoch": 3, "args": "x"})


def test_heads_and_grid_inference(official):
    assert cv.default_num_heads(768) == 12 and cv.default_num_heads(1280) == 16
    assert cv.default_num_heads(512, cv.DECODER_HEADS) == 16 and cv.default_num_heads(128, cv.DECODER_HEADS) == 4
    assert cv.default_num_heads(320) == 5 and cv.default_num_heads(96) == 3
    with pytest.raises(ValueError, match="num_heads"):
        cv.default_num_heads(40)
    v = VisionTransformer(img_size=(16, 32), patch_size=4, embed_dim=64, depth=1, num_heads=4, num_classes=0)
    with pytest.raises(ValueError, match="img_size"):
        cv.infer_vit_kwargs(v.state_dict())
    kw = cv.infer_vit_kwargs(v.state_dict(), img_size=(16, 32), num_heads=4)
    assert kw["img_size"] == (16, 32) and kw["num_classes"] == 0 and kw["global_pool"] == "avg"


# ------------------------------------------------------------------ errors and safety

def test_encoder_to_hf_pretraining_names_decoder_keys(official):
    pytest.importorskip("transformers")
    enc = cv.mae_encoder(official["mae_state_dict"])
    with pytest.raises(ValueError) as e:
        cv.fastmae_to_hf_mae(enc, _official_kwargs(official["config"]))
    msg = str(e.value)
    assert "decoder_embed.weight" in msg and "mask_token" in msg and "_full.pth" in msg and "visualize" in msg
    with pytest.raises(ValueError, match="decoder_embed.weight"):
        cv.infer_mae_kwargs(enc)
    hf = _hf_mae()
    partial = {k: v for k, v in hf.state_dict().items() if not k.startswith("decoder.decoder_embed")}
    with pytest.raises(ValueError, match=r"'decoder.decoder_embed.weight'.*visualize"):
        cv.hf_mae_to_fastmae(partial, hf.config)


def test_shape_mismatch_names_key_and_shapes(official):
    sd = dict(official["mae_state_dict"])
    sd["decoder_pred.weight"] = torch.zeros(12, 32)
    with pytest.raises(ValueError) as e:
        cv.check_state_dict(sd, "mae", _official_kwargs(official["config"]))
    assert "'decoder_pred.weight'" in str(e.value) and "(12, 32)" in str(e.value) and "(48, 32)" in str(e.value)
    hf = _hf_mae()
    hf_sd = dict(hf.state_dict())
    k = next(k for k in hf_sd if k.endswith("decoder_pred.weight"))
    hf_sd[k] = torch.zeros(12, 32)
    with pytest.raises(ValueError) as e:
        cv.hf_mae_to_fastmae(hf_sd, hf.config)
    assert k in str(e.value) and "(12, 32)" in str(e.value) and "(48, 32)" in str(e.value)


class _Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Evil(str(marker))}, bad)
    with pytest.raises(ValueError) as e:
        cv.read_file(bad)[0]
    assert "pickled Python objects" in str(e.value) and "torch.save(ckpt['model']" in str(e.value)
    assert "safetensors" in str(e.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="pickled Python objects"):
        convert_cmd.convert(bad, tmp_path / "out", "fastmae")
    assert not marker.exists()


def test_save_fastmae_round_trip_and_no_temp_files(tmp_path, official):
    sd = official["mae_state_dict"]
    meta = {"kind": "mae", "model_kwargs": _official_kwargs(official["config"])}
    out = cv.save_fastmae(tmp_path / "m", sd, meta)
    assert out == tmp_path / "m.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    loaded, side = cv.read_file(out)
    _equal_sd(loaded, sd)
    assert side == json.loads(json.dumps(meta))
    with pytest.raises(ValueError, match="kind"):
        cv.save_fastmae(tmp_path / "x", sd, {"model_kwargs": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_avg_pool_classifier_has_no_hf_equivalent(official, tmp_path):
    pytest.importorskip("transformers")
    sd = official["classifier_avg"]["state_dict"]
    with pytest.raises(ValueError, match="fc_norm"):
        cv.fastmae_to_hf_vit(sd, _vit_kwargs(official["config"], "avg"))
    torch.save(sd, tmp_path / "avg.pth")
    with pytest.raises(ValueError, match="global_pool='token'"):
        convert_cmd.convert(tmp_path / "avg.pth", tmp_path / "hf", "hf", num_heads=4)


# ------------------------------------------------------------------ the command, end to end on files

def test_convert_end_to_end(official, tmp_path):
    tf = pytest.importorskip("transformers")
    cfg = official["config"]
    src = tmp_path / "mae_visualize.pth"
    torch.save({"model": official["mae_state_dict"]}, src)  # the official release's layout

    # official -> fastmae: the sidecar makes the model buildable; it reproduces the official loss
    out = convert_cmd.convert(src, tmp_path / "fm" / "mae", "fastmae", num_heads=4, decoder_num_heads=4)
    sd, meta = cv.read_file(out)
    assert meta["kind"] == "mae" and meta["source_format"] == "fastmae-mae"
    m = MaskedAutoencoderViT(**meta["model_kwargs"]).eval()
    m.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(m(official["imgs"], 0.75, official["noise"])[0], official["loss"], atol=1e-5,
                                   rtol=0)

    # fastmae -> hf (heads from the sidecar) -> from_pretrained reproduces the official prediction
    hf_dir = convert_cmd.convert(out, tmp_path / "hf", "hf")
    hf = tf.ViTMAEForPreTraining.from_pretrained(hf_dir).eval()
    assert hf.config.num_attention_heads == 4 and hf.config.layer_norm_eps == 1e-6
    with torch.no_grad():
        torch.testing.assert_close(hf(official["imgs"], noise=official["noise"]).logits, official["pred"],
                                   atol=1e-5, rtol=0)

    # hf -> fastmae -> official: identity on the official weights
    back = convert_cmd.convert(hf_dir, tmp_path / "back", "fastmae")
    assert cv.read_file(back)[1]["model_kwargs"]["decoder_num_heads"] == 4
    off = convert_cmd.convert(back, tmp_path / "again.pth", "official")
    _equal_sd(torch.load(off, weights_only=True)["model"], official["mae_state_dict"])

    # MAE -> timm keeps the encoder; encoder -> hf is a ViTMAEModel
    enc = convert_cmd.convert(src, tmp_path / "enc.safetensors", "timm", num_heads=4, decoder_num_heads=4)
    _equal_sd(cv.read_file(enc)[0], cv.mae_encoder(official["mae_state_dict"]))
    enc_hf = convert_cmd.convert(enc, tmp_path / "enc_hf", "hf", num_heads=4)
    assert json.loads((enc_hf / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    tf.ViTMAEModel.from_pretrained(enc_hf)

    # classifiers: token -> hf gives the official logits; avg -> timm .pth -> fastmae is identity
    tok = tmp_path / "tok.pth"
    torch.save({"model": official["classifier_token"]["state_dict"]}, tok)
    hfc = tf.ViTForImageClassification.from_pretrained(convert_cmd.convert(tok, tmp_path / "tok_hf", "hf", num_heads=4))
    with torch.no_grad():
        torch.testing.assert_close(hfc.eval()(official["imgs"]).logits, official["classifier_token"]["logits"],
                                   atol=1e-5, rtol=0)
    avg = tmp_path / "avg.safetensors"
    cv.save_timm(avg, official["classifier_avg"]["state_dict"])
    t = convert_cmd.convert(avg, tmp_path / "avg_timm.pth", "timm", num_heads=4)
    fm = convert_cmd.convert(t, tmp_path / "avg_fm", "fastmae", num_heads=4)
    sd, meta = cv.read_file(fm)
    _equal_sd(sd, official["classifier_avg"]["state_dict"])
    assert meta["model_kwargs"] == {**_vit_kwargs(cfg, "avg"), "mlp_ratio": 4.0}
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_convert_config_fields():
    fields = {f.name for f in ConvertConfig.__dataclass_fields__.values()}
    assert {"init", "output", "to", "model"} <= fields  # one vocabulary: --init reads, --model.* sizes
    c = ConvertConfig(init="a", output="b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.to = "hf"  # frozen


def test_works_without_transformers(official, tmp_path, monkeypatch):
    """Reading Hugging Face files needs only safetensors + json; writing them needs transformers."""
    pytest.importorskip("transformers")
    kw = _official_kwargs(official["config"])
    hf_dir = cv.save_hf(tmp_path / "hf", *cv.fastmae_to_hf_mae(official["mae_state_dict"], kw, style="legacy"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    out = convert_cmd.convert(hf_dir, tmp_path / "fm", "fastmae")
    sd, meta = cv.read_file(out)
    _equal_sd(sd, official["mae_state_dict"])
    assert meta["model_kwargs"]["num_heads"] == 4 and meta["mask_ratio"] == 0.75
    with pytest.raises(ImportError, match=r"fastmae\[hf\]"):
        convert_cmd.convert(out, tmp_path / "hf2", "hf")


@pytest.mark.parametrize("to", ["hf", "fastmae"])
def test_a_convert_that_fails_half_way_leaves_no_files(tmp_path, monkeypatch, to):
    """Issue #29: a full disk while writing config.json left model.safetensors alone, and the rerun was refused."""
    from fastmae.models.mae import MaskedAutoencoderViT
    from fastmae.weights.checkpoint import DiskFullError
    from fastmae.weights.convert import files

    mae = MaskedAutoencoderViT(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")

    def full(path, text):
        raise DiskFullError(f"no space left writing {path}")

    monkeypatch.setattr(files, "_save_text", full)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError):
        convert_cmd.convert(tmp_path / "mae.pth", out, to, num_heads=2, decoder_num_heads=2)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "mae.pth"] == []
    monkeypatch.undo()
    assert convert_cmd.convert(tmp_path / "mae.pth", out, to, num_heads=2, decoder_num_heads=2).exists()
