"""The pose model (models/pose.py): heatmap targets and their sub-pixel decode, the flip test, the two heads, and
parity with Hugging Face `VitPoseForPoseEstimation` (weights in both directions, same heatmaps)."""

from __future__ import annotations

import pytest
import torch

from fastmae.models.pose import (
    ClassicHead,
    SimpleHead,
    build_pose,
    dark_decode,
    encode_heatmaps,
    flip_back,
    flip_index,
    vitpose_map,
    vitpose_padding,
)
from fastmae.weights.convert.vitpose import (
    fastmae_to_hf_vitpose,
    hf_vitpose_to_fastmae,
    is_vitpose,
)

transformers = pytest.importorskip("transformers")


def test_decode_recovers_subpixel_peaks():
    """A Gaussian target at any sub-pixel place decodes back to it within 0.1 heatmap px (DARK), where the
    arg-max alone is off by up to half a pixel."""
    g = torch.Generator().manual_seed(0)
    kp = torch.rand(4, 6, 2, generator=g) * torch.tensor([30.0, 40.0]) + 9  # (B, K, 2) away from the border
    heat, w = encode_heatmaps(kp, torch.ones(4, 6), (56, 48), sigma=2.0)
    assert heat.shape == (4, 6, 56, 48) and w.eq(1).all()
    assert heat.amax((-2, -1)).gt(0.85).all()  # peaks near 1 at the sub-pixel place
    xy, scores = dark_decode(heat)
    err = (xy - kp).norm(dim=-1)
    assert err.max() < 0.1, err.max()
    argmax = heat.flatten(2).argmax(-1)
    coarse = torch.stack([argmax % 48 + 0.5, argmax // 48 + 0.5], -1).float()
    assert (coarse - kp).norm(dim=-1).max() > 0.2  # the decode is doing the work
    assert torch.allclose(scores, heat.amax((-2, -1)))


def test_targets_far_outside_get_no_weight():
    kp = torch.tensor([[[-7.0, 5.0], [5.0, 5.0], [5.0, 30.0]]])  # 3.5 sigma left, inside, 3 sigma + 4 below
    _, w = encode_heatmaps(kp, torch.tensor([[1.0, 1.0, 0.0]]), (16, 16), sigma=2.0)
    assert w.tolist() == [[0.0, 1.0, 0.0]]


def test_flip_index_pairs_left_and_right():
    names = ["nose", "left_eye", "right_eye", "l_hand", "r_hand", "leftFoot", "rightFoot", "centre"]
    assert flip_index(names) == [0, 2, 1, 4, 3, 6, 5, 7]
    assert flip_index(["a", "b", "c"], [(0, 2)]) == [2, 1, 0]


def test_flip_back_is_exact_in_continuous_coordinates():
    """A keypoint at x in a W-wide crop is at W - x in the mirror image: decoding the flipped-back heatmap of the
    mirror image gives the same place, and partners swap."""
    kp = torch.tensor([[[5.3, 7.1], [20.6, 9.9]]])  # (1, 2, 2): a left and a right keypoint
    heat, _ = encode_heatmaps(kp, torch.ones(1, 2), (24, 32), 2.0)
    mirrored = torch.stack([32 - kp[..., 0], kp[..., 1]], -1)[:, [1, 0]]  # flipped and partners swapped
    heat_m, _ = encode_heatmaps(mirrored, torch.ones(1, 2), (24, 32), 2.0)
    back = flip_back(heat_m, [1, 0])
    assert torch.allclose(back, heat, atol=1e-6)
    assert (dark_decode(back)[0] - kp).abs().max() < 0.1


@pytest.mark.parametrize("cls", [SimpleHead, ClassicHead])
def test_heads_upsample_four_times_and_learn(cls):
    torch.manual_seed(0)
    head = cls(16, 3, patch_size=8) if cls is SimpleHead else cls(16, 3, patch_size=8, channels=8)
    feats = torch.randn(2, 16, 4, 3)
    out = head(feats)
    assert out.shape == (2, 3, 16, 12)
    assert head.stride == 2  # crop pixels per heatmap pixel
    kp = torch.tensor([[[6.0, 10.0], [12.0, 20.0], [3.0, 3.0]]]).expand(2, -1, -1)  # crop pixels
    targets = {"keypoints": kp, "weights": torch.tensor([[1.0, 1.0, 0.0]] * 2)}
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    first = head.loss(head(feats), targets)["loss_heatmap"].item()
    for _ in range(150):
        opt.zero_grad()
        loss = head.loss(head(feats), targets)["loss_heatmap"]
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    head.eval()
    xy, _ = head.predict(head(feats))
    assert (xy[:, :2] - kp[:, :2]).norm(dim=-1).max() < 2.0  # back in crop pixels


def test_padding_keeps_the_patch_grid():
    assert vitpose_padding(16) == 2 and vitpose_padding(4) == 0
    model = build_pose({"encoder": dict(img_size=(32, 16), patch_size=4, in_chans=1, embed_dim=16, depth=1,
                                        num_heads=2), "head": "simple", "num_keypoints": 2})
    with pytest.raises(ValueError, match="patch padding"):
        vitpose_map(model.encoder, torch.zeros(1, 1, 32, 16), patch_padding=3)
    assert vitpose_map(model.encoder, torch.zeros(1, 1, 32, 16)).shape == (1, 16, 8, 4)
    assert model(torch.zeros(1, 1, 32, 16)).shape == (1, 2, 32, 16)


def test_flip_test_is_flip_equivariant():
    """The flip-tested heatmaps of a mirrored crop are those of the crop flipped back (partners swapped): what
    makes the flip test a symmetric average, whatever the weights."""
    torch.manual_seed(0)
    model = build_pose({"encoder": dict(img_size=(16, 16), patch_size=4, in_chans=1, embed_dim=16, depth=1,
                                        num_heads=2), "head": "simple", "num_keypoints": 3,
                        "names": ["left_a", "mid", "right_a"]}).eval()
    assert model.flip == [2, 1, 0]
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model.flip_test(x.flip(-1)), flip_back(model.flip_test(x), model.flip))
    assert not torch.allclose(model(x.flip(-1)), flip_back(model(x), model.flip), atol=1e-4)  # the plain one is not


# ---------------------------------------------------------------------------------------------------
# Hugging Face VitPose parity.


def hf_vitpose(simple: bool, image=(32, 24), patch=8, eps=1e-12, seed=0):
    from transformers import (
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
    )

    bb = VitPoseBackboneConfig(image_size=list(image), patch_size=[patch, patch], num_channels=3, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, out_indices=[2],
                               layer_norm_eps=eps)
    cfg = VitPoseConfig(backbone_config=bb, use_simple_decoder=simple, num_labels=5)
    torch.manual_seed(seed)
    model = VitPoseForPoseEstimation(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases and batch-norm statistics
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 1.5)
            elif "running_mean" in name:
                b.normal_(0, 0.1)
    return model


def fastmae_from_hf(hf):
    sd, kw = hf_vitpose_to_fastmae(hf.state_dict(), hf.config.to_dict())
    model = build_pose(kw)
    model.load_state_dict(sd, strict=True)
    return model.eval(), kw


@pytest.mark.parametrize("simple,image,eps", [(True, (32, 24), 1e-12), (False, (24, 40), 1e-6)])
def test_hf_vitpose_heatmaps_match(simple, image, eps):
    hf = hf_vitpose(simple, image, eps=eps)
    assert is_vitpose(hf.state_dict())
    ours, kw = fastmae_from_hf(hf)
    assert kw["head"] == ("simple" if simple else "classic") and kw["norm_eps"] == eps
    x = torch.randn(2, 3, *image)
    with torch.no_grad():
        want = hf(pixel_values=x).heatmaps
        got = ours(x)
    assert got.shape == want.shape == (2, 5, image[0] // 2, image[1] // 2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("simple", [True, False])
def test_export_to_hf_vitpose_round_trip(simple, tmp_path):
    from transformers import VitPoseConfig, VitPoseForPoseEstimation

    hf = hf_vitpose(simple, (32, 24))
    ours, kw = fastmae_from_hf(hf)
    sd, config = fastmae_to_hf_vitpose(ours.state_dict(), kw)
    again = VitPoseForPoseEstimation(VitPoseConfig(**config)).eval()
    missing, unexpected = again.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    x = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).heatmaps, ours(x), atol=1e-4, rtol=0)


def test_moe_and_unsupported_vitpose_are_refused():
    hf = hf_vitpose(True)
    cfg = hf.config.to_dict()
    cfg["backbone_config"]["num_experts"] = 6
    with pytest.raises(ValueError, match="mixture-of-experts"):
        hf_vitpose_to_fastmae(hf.state_dict(), cfg)
    cfg["backbone_config"]["num_experts"] = 1
    cfg["backbone_config"]["out_indices"] = [1]
    with pytest.raises(ValueError, match="reads block 1"):
        hf_vitpose_to_fastmae(hf.state_dict(), cfg)
    ours, kw = fastmae_from_hf(hf)
    with pytest.raises(ValueError, match="pads its patch convolution by 0"):
        fastmae_to_hf_vitpose(ours.state_dict(), {**kw, "patch_padding": 0})
