"""The training crop's resize by torch's uint8 antialiased bicubic kernel against Pillow.

Law: torchvision's RandomResizedCrop on a Pillow image (crop the box, then bicubic resize) — the augmentation
the official MAE code uses. Tolerance, 8-bit levels: max |diff| <= 2 and mean < 0.25 per image against Pillow's
crop + resize, for grey and RGB, shrinking and enlarging crops, with and without the flip. Pillow's box resize
(the path kept for fractional boxes and other CPUs) also reads pixels just outside the box, so the two differ
in the crop's outermost pixels only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import decode, load_image
from tests.data.test_jpeg_decode import save_jpeg

ID_MEAN, ID_STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # outputs are 8-bit levels


def levels(path, channels: int, seed: int, size=(224, 224), **kw) -> torch.Tensor:
    """load_image's train output on the 0-255 scale."""
    return load_image(path, size, channels, ID_MEAN[:channels], ID_STD[:channels], train=True,
                      generator=torch.Generator().manual_seed(seed), **kw)


def pillow_crop_resize(path, channels: int, seed: int, size=(224, 224)) -> torch.Tensor:
    """torchvision's law with Pillow: the same box and flip from the same seed, crop, then bicubic resize."""
    img = Image.open(path).convert("L" if channels == 1 else "RGB")
    (top, left, h, w), flip = decode._crop_and_flip((img.height, img.width), size, True, (0.2, 1.0), True,
                                                   torch.Generator().manual_seed(seed))
    out = img.crop((left, top, left + w, top + h)).resize(size[::-1], Image.Resampling.BICUBIC)
    a = torch.from_numpy(np.array(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)).float()
    return a[None] if a.ndim == 2 else a.permute(2, 0, 1)


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
@pytest.mark.parametrize("wh", [(500, 375), (120, 90), (1000, 700)])  # shrink, enlarge, large (full decode)
def test_torch_resize_follows_pillow_crop_then_resize(tmp_path, mode, channels, wh):
    path = save_jpeg(tmp_path / "a.jpg", *wh, mode=mode)
    for seed in range(8):
        got = levels(path, channels, seed, fast_jpeg=False, torch_resize=True)
        want = pillow_crop_resize(path, channels, seed)
        d = (got - want).abs()
        assert d.max() <= 2.001 and d.mean() < 0.25, (seed, float(d.max()), float(d.mean()))


def test_non_square_output(tmp_path):
    path = save_jpeg(tmp_path / "a.jpg", 500, 375)
    for seed in range(3):
        got = levels(path, 3, seed, size=(96, 160), fast_jpeg=False, torch_resize=True)
        assert got.shape == (3, 96, 160)
        assert (got - pillow_crop_resize(path, 3, seed, size=(96, 160))).abs().max() <= 2.001


@pytest.fixture
def torch_resizes(monkeypatch) -> list[tuple]:
    """The boxes load_image resized with torch, in order."""
    calls: list[tuple] = []
    real = decode._resized_crop_uint8

    def spy(plane, box, out_hw):
        calls.append(box)
        return real(plane, box, out_hw)

    monkeypatch.setattr(decode, "_resized_crop_uint8", spy)
    return calls


def test_which_crops_take_the_torch_resize(tmp_path, torch_resizes):
    """Whole-pixel training crops of 8-bit images do; fractional (eval) boxes, images of other channel counts and
    torch_resize=False stay with Pillow."""
    small = save_jpeg(tmp_path / "s.jpg", 500, 375)
    levels(small, 3, 0, torch_resize=True)
    assert len(torch_resizes) == 1
    levels(small, 3, 0, torch_resize=False)
    load_image(small, (224, 224), 3, ID_MEAN, ID_STD, train=False, torch_resize=True)  # eval: fractional box
    rgba = tmp_path / "a.png"
    Image.open(small).convert("RGBA").save(rgba)
    load_image(rgba, (224, 224), 4, ID_MEAN + (0.0,), ID_STD + (1.0,), train=True, torch_resize=True)  # 4 planes
    assert len(torch_resizes) == 1


def test_module_switch_and_default(tmp_path, monkeypatch, torch_resizes):
    """TORCH_RESIZE is the default (on where the CPU has the vectorised kernel); False keeps Pillow everywhere."""
    path = save_jpeg(tmp_path / "s.jpg", 500, 375)
    assert decode.TORCH_RESIZE == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    monkeypatch.setattr(decode, "TORCH_RESIZE", False)
    levels(path, 3, 0)
    assert torch_resizes == []
    monkeypatch.setattr(decode, "TORCH_RESIZE", True)
    levels(path, 3, 0)
    assert len(torch_resizes) == 1
