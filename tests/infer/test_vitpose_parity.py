"""A Hugging Face VitPose model in fastmae crops and decodes as transformers' VitPose image processor does (UDP):
its crops equal the processor's up to rounding, its keypoints the processor's post-processing within 0.001 px
(0.1 px on an untrained model's flat maps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data.pose import box_centre_scale, udp_crop_matrix, udp_keypoints, warp
from fastmae.infer.predictors import HF_DARK_SIGMA
from fastmae.models.pose import DARK_KERNEL, dark_decode, encode_heatmaps

vp = pytest.importorskip("transformers.models.vitpose.image_processing_pil_vitpose")
pytest.importorskip("scipy")

H, W, Hh, Wh = 256, 192, 64, 48


def boxes(n: int, g: torch.Generator) -> list[list[float]]:
    raw = torch.rand(n, 4, generator=g) * torch.tensor([200.0, 200.0, 300.0, 300.0]) + torch.tensor([0, 0, 20, 20])
    return raw.tolist()


@pytest.mark.parametrize("maps", ["peaked", "noise"])
def test_udp_keypoints_equal_the_processors_post_processing(maps):
    """On Gaussian peaks and on the flat noise of an untrained model (peaks at the border, near-singular Hessians)."""
    g = torch.Generator().manual_seed(0)
    B, K = 6, 17
    truth = torch.rand(B, K, 2, generator=g) * torch.tensor([Wh - 12.0, Hh - 12.0]) + 6  # heatmap pixels
    heat, _ = encode_heatmaps(truth, torch.ones(B, K), (Hh, Wh), 2.0)
    if maps == "noise":
        heat = torch.rand(B, K, Hh, Wh, generator=g) * 0.01 + 0.001
    bx = boxes(B, g)
    proc = vp.VitPoseImageProcessorPil()
    cs = [vp.box_to_center_and_scale(b, W, H) for b in bx]
    ref, ref_scores = proc.keypoints_from_heatmaps(heat.numpy(), np.stack([c for c, _ in cs]),
                                                   np.stack([s for _, s in cs]), kernel=DARK_KERNEL)
    A = torch.stack([udp_crop_matrix(*box_centre_scale(b, W / H), (H, W)) for b in bx])
    xy, scores = dark_decode(heat, DARK_KERNEL, sigma=HF_DARK_SIGMA, keep_max=False, bounded=False)
    ours = udp_keypoints(xy, A, (H, W), (Hh, Wh))
    assert np.abs(ours.numpy() - ref).max() < (1e-3 if maps == "peaked" else 0.1)
    assert np.allclose(scores.numpy(), ref_scores[..., 0])


def test_udp_crops_equal_the_processors():
    img = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    box = [50.3, 40.7, 120.2, 200.9]
    proc = vp.VitPoseImageProcessorPil()
    hf = proc(images=Image.fromarray(img), boxes=[[box]], return_tensors="pt", do_normalize=False,
              do_rescale=False)["pixel_values"][0].float()  # (3, 256, 192)
    A = udp_crop_matrix(*box_centre_scale(box, W / H), (H, W))
    ours = warp(torch.from_numpy(img).permute(2, 0, 1)[None].float(), A, (H, W))[0]
    assert (hf - ours).abs().max() <= 0.51  # the processor rounds its crop to whole grey levels
