"""The dense-task contract: DenseModel (frozen or fine-tuned encoder + head), the heads' forward/loss/predict, and the
loop's tree map of targets; `load_into`, the one way weights enter a model of another size."""

from __future__ import annotations

import pytest
import torch

from fastmae.models.dense import DenseModel
from fastmae.models.heads import FPNSegHead, LinearHead, LinearSegHead
from fastmae.models.vit import VisionTransformer
from fastmae.train.engine import to_device
from fastmae.weights.backbone import load_into

VIT = dict(img_size=(16, 16), patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=0,
           global_pool="token")


@pytest.mark.parametrize("finetune", [False, True])
def test_dense_model_freezes_the_encoder_unless_finetuned(finetune):
    torch.manual_seed(0)
    enc = VisionTransformer(**VIT)
    model = DenseModel(enc, LinearSegHead(32, 3, patch_size=4), finetune=finetune)
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))
    out = model(x)
    assert out.shape == (2, 3, 16, 16) and model.head.predict(out).shape == (2, 16, 16)
    model.head.loss(out, y)["loss_ce"].backward()
    assert (enc.patch_embed.proj.weight.grad is not None) == finetune
    assert model.head.cls.weight.grad is not None


def test_segmentation_heads_upsample_to_the_image_and_skip_ignored_pixels():
    feats = torch.randn(2, 32, 4, 6)  # a 16x24 image at patch 4
    for head in (LinearSegHead(32, 5, patch_size=4, ignore_index=255), FPNSegHead(32, 5, patch_size=4, channels=8)):
        head.eval()
        out = head(feats)
        assert out.shape == (2, 5, 16, 24)
        y = torch.full((2, 16, 24), 255)
        y[:, 0, 0] = 1
        expected = torch.nn.functional.cross_entropy(out[:, :, 0, 0], torch.tensor([1, 1]))
        torch.testing.assert_close(head.loss(out, y), {"loss_ce": expected})


def test_linear_head_classifies_vectors():
    head = LinearHead(8, 4).eval()
    out = head(torch.randn(3, 8))
    assert out.shape == (3, 4) and torch.equal(head.predict(out), out.argmax(1))


def test_targets_of_any_structure_reach_the_device():
    t = {"boxes": [torch.zeros(2, 4), torch.zeros(0, 4)], "labels": (torch.ones(2),), "name": "x"}
    moved = to_device(t, torch.device("cpu"))
    assert moved["name"] == "x" and isinstance(moved["labels"], tuple) and moved["boxes"][0].shape == (2, 4)


def test_load_into_resamples_positions_and_names_every_misfit():
    torch.manual_seed(0)
    small = VisionTransformer(**VIT)
    big = VisionTransformer(**{**VIT, "img_size": (24, 16)})
    notes = load_into(big, small.state_dict(), (4, 4), "test")
    assert notes == ["position embeddings resampled from 4x4 to 6x4"]
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    sd = dict(small.state_dict())
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"^test: missing \[\], unexpected \[\], shape mismatches \['blocks.0.mlp.fc1"):
        load_into(small, sd, (4, 4), "test")
    sd = {k: v for k, v in small.state_dict().items() if not k.startswith("norm.")}
    with pytest.raises(ValueError, match=r"missing \['norm.bias', 'norm.weight'\]"):
        load_into(small, sd, (4, 4), "test")
    load_into(small, sd, (4, 4), "test", may_miss=("norm.",))  # allowed to keep its fresh init
