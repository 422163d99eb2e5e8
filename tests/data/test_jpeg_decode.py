"""JPEG decode at reduced size (libjpeg DCT scaling via Image.draft) against the full decode.

Tolerance, pixels on the [0, 1] scale, fast path vs full decode + the same bicubic resize: mean absolute
difference < 0.02 and max < 0.25 per image (before normalisation), on photo-like JPEGs (smooth gradients,
edges, fine texture, quality 90). Crop boxes and flips are drawn by the same generator calls in the same order,
so they are equal; files where no reduction applies (small images, non-JPEG, CMYK, other channel counts) are
decoded exactly as before (bit-exact).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from fastmae.data import decode, load_image

MEAN_TOL, MAX_TOL = 0.02, 0.25
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # identity normalisation: outputs are pixels in [0, 1]


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 photo-like image: smooth colour gradients, a few sharp discs, fine texture."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    chans = [0.5 + 0.25 * np.sin(2 * np.pi * (g.uniform(0.5, 2) * x + g.uniform(0.5, 2) * y) + g.uniform(0, 6))
             + 0.2 * (x - y) * (c - 1) for c in range(3)]
    arr = np.stack(chans, -1)  # (h, w, 3)
    for _ in range(6):  # sharp-edged discs
        cy, cx, r = g.uniform(0, height), g.uniform(0, width), g.uniform(0.05, 0.2) * min(width, height)
        arr[(y * max(width, height) - cy) ** 2 + (x * max(width, height) - cx) ** 2 < r * r] = g.uniform(0, 1, 3)
    noise = Image.fromarray((g.uniform(0, 255, (height, width))).astype(np.uint8))
    noise = np.asarray(noise.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64) / 255 - 0.5
    arr = arr + 0.25 * noise[..., None] + 0.04 * np.sin(2 * np.pi * x * max(width, height) / 5)[..., None]
    return (np.clip(arr, 0, 1) * 255).astype(np.uint8)


def save_jpeg(path, width: int, height: int, seed: int = 0, orientation: int = 1, mode: str = "RGB") -> str:
    """A photo-like JPEG (quality 90); orientation != 1 is written as the EXIF tag (pixels stored as given)."""
    img = Image.fromarray(photo(width, height, seed)).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(path, quality=90, exif=exif.tobytes())
    return str(path)


@pytest.fixture
def drafts(monkeypatch) -> list[int]:
    """The scales load_image asked libjpeg for, in order (so a test fails if the fast path never ran)."""
    scales: list[int] = []
    real = decode._draft

    def spy(img, scale):
        scales.append(scale)
        real(img, scale)

    monkeypatch.setattr(decode, "_draft", spy)
    return scales


def both(path, size=(224, 224), channels=3, train=True, seed=0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """load_image's output with the fast JPEG path and with the full decode, from the same seed."""
    out = []
    for fast in (True, False):
        g = torch.Generator().manual_seed(seed)
        out.append(load_image(path, size, channels, MEAN[:channels], STD[:channels], train=train, generator=g,
                              fast_jpeg=fast, **kw))
    return out[0], out[1]


def assert_close(fast: torch.Tensor, full: torch.Tensor) -> None:
    """Fast path within the stated tolerance of the full decode."""
    assert fast.shape == full.shape
    d = (fast - full).abs()
    assert d.mean() < MEAN_TOL and d.max() < MAX_TOL, (float(d.mean()), float(d.max()))


def test_dct_scale_keeps_the_crop_at_least_the_output_size():
    assert decode.dct_scale((375, 500), (224, 224)) == 1  # a 500x375 photo to 224: never reducible
    assert decode.dct_scale((448, 448), (224, 224)) == 2
    assert decode.dct_scale((447, 2000), (224, 224)) == 1
    assert decode.dct_scale((1800, 1900), (224, 224)) == 8
    assert decode.dct_scale((1000, 900), (224, 224)) == 4
    assert decode.dct_scale((100, 100), (224, 224)) == 1  # upscaled crops stay at full size


def test_same_boxes_and_generator_calls(tmp_path, monkeypatch, drafts):
    """(a) the fast path draws the same boxes from the same generator state, and leaves it in the same state."""
    path = save_jpeg(tmp_path / "a.jpg", 1024, 768)
    real = decode.sample_crop_box
    calls: list = []  # ((height, width) the box was drawn in, box) per call

    def recording(height, width, *args, **kw):
        box = real(height, width, *args, **kw)
        calls.append(((height, width), box))
        return box

    monkeypatch.setattr(decode, "sample_crop_box", recording)
    runs = {}
    for fast in (True, False):
        calls.clear()
        states = []
        for seed in range(12):
            g = torch.Generator().manual_seed(seed)
            load_image(path, (224, 224), 3, MEAN, STD, train=True, generator=g, fast_jpeg=fast)
            states.append(g.get_state())
        runs[fast] = (list(calls), states)
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 12
    assert all(h_w == (768, 1024) for h_w, _ in runs[True][0])  # drawn in the full-size frame
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))  # flip coin drawn too, same order
    assert 2 in drafts  # some crops were decoded at half size


@pytest.mark.parametrize("size", [(500, 375), (1024, 768), (2048, 1536), (64, 48)])
def test_pixels_within_tolerance(tmp_path, drafts, size):
    """(b) RandomResizedCrop + flip of the fast path vs the full decode; reductions happen only on large photos."""
    path = save_jpeg(tmp_path / "p.jpg", *size, seed=size[0])
    for seed in range(10):
        fast, full = both(path, seed=seed)
        assert_close(fast, full)
        if not drafts:  # nothing reduced so far: the same decode, bit for bit
            assert torch.equal(fast, full)
    if size[1] < 448:
        assert drafts == []
    else:
        assert drafts, "no crop of a large photo was decoded at reduced size"


def test_grey_jpeg_within_tolerance(tmp_path, drafts):
    """A grey JPEG decoded at reduced size, to 1 and to 3 channels."""
    path = save_jpeg(tmp_path / "g.jpg", 1024, 768, mode="L")
    for channels in (1, 3):
        for seed in range(4):
            assert_close(*both(path, channels=channels, seed=seed))
    assert drafts


def _png(path, arr: np.ndarray, mode: str | None = None) -> str:
    """A PNG of `arr` (optionally converted to mode)."""
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(path)
    return str(path)


@pytest.mark.parametrize("kind", ["png_rgb", "png_rgba", "png_grey", "png_16bit", "jpeg_cmyk", "jpeg_4ch"])
def test_other_files_take_the_old_path(tmp_path, drafts, kind):
    """(c) non-JPEG files, CMYK JPEGs and channel counts other than 1 or 3: bit-exact with the full decode."""
    arr = photo(1024, 768)
    if kind == "png_rgb":
        path = _png(tmp_path / "x.png", arr)
    elif kind == "png_rgba":
        path = _png(tmp_path / "x.png", np.concatenate([arr, arr[..., :1]], -1))
    elif kind == "png_grey":
        path = _png(tmp_path / "x.png", arr, "L")
    elif kind == "png_16bit":
        path = _png(tmp_path / "x.png", arr[..., 0].astype(np.uint16) * 257)
    elif kind == "jpeg_cmyk":
        path = str(tmp_path / "x.jpg")
        Image.fromarray(arr).convert("CMYK").save(path, quality=90)
    else:  # 4 channels requested from an RGB JPEG: refused the same way by both paths, never drafted
        path = save_jpeg(tmp_path / "x.jpg", 1024, 768)
    if kind == "jpeg_4ch":
        for fast in (True, False):
            with pytest.raises(ValueError, match="expects 4 channels"):
                load_image(path, (224, 224), 4, MEAN + (0.0,), STD + (1.0,), fast_jpeg=fast)
    else:
        for ch in (3, 1):
            for train in (True, False):
                fast, full = both(path, channels=ch, train=train, seed=3)
                assert torch.equal(fast, full)
    assert drafts == []


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_jpeg(tmp_path, drafts, orientation):
    """(d) EXIF orientations 1-8 on a size that is no multiple of 8: the reduced decode lands on the same pixels."""
    path = save_jpeg(tmp_path / "r.jpg", 1021, 765, orientation=orientation)
    expect = (765, 1021) if orientation < 5 else (1021, 765)  # upright (h, w)
    full = decode.decode_image(path, 3)
    assert tuple(full.shape[1:]) == expect
    for seed in range(8):
        assert_close(*both(path, seed=seed))
    fast, ref = both(path, size=(96, 96), seed=0, crop_scale=(1.0, 1.0))  # whole image at 1/4 or 1/8 scale
    assert_close(fast, ref)
    assert drafts and max(drafts) >= 4


def test_eval_centre_crop_benefits(tmp_path, drafts):
    """(e) the eval transform (resize to 256, centre 224) of a 1024x768 JPEG decodes at half size, within tolerance."""
    path = save_jpeg(tmp_path / "e.jpg", 1024, 768)
    assert_close(*both(path, train=False))
    assert drafts == [2]
    drafts.clear()
    big = save_jpeg(tmp_path / "big.jpg", 2048, 1536, seed=1)
    assert_close(*both(big, train=False))
    assert drafts == [4]


def test_module_switch_turns_the_fast_path_off(tmp_path, monkeypatch, drafts):
    """FAST_JPEG = False makes the default load_image the full decode (the benchmark's reference)."""
    path = save_jpeg(tmp_path / "s.jpg", 2048, 1536)
    monkeypatch.setattr(decode, "FAST_JPEG", False)
    load_image(path, (224, 224), 3, MEAN, STD, train=False)
    assert drafts == []
    monkeypatch.setattr(decode, "FAST_JPEG", True)
    load_image(path, (224, 224), 3, MEAN, STD, train=False)
    assert drafts == [4]


def test_pixel_limit_checked_before_the_draft(tmp_path):
    """The decompression-bomb limit counts the full-size pixels, not the reduced decode's."""
    path = save_jpeg(tmp_path / "big.jpg", 2048, 1536)
    with pytest.raises(decode.UnreadableImageError, match="too large to decode safely"):
        load_image(path, (224, 224), 3, MEAN, STD, max_image_pixels=2048 * 1536 - 1)


@pytest.mark.parametrize("orientation", [1, 6])
def test_benchmark_reference_equals_todays_full_decode(tmp_path, orientation):
    """bench_data's reference (the per-file transform when issue #12 was filed) and today's load_image with the full
    decode and Pillow's resize give the same pixels for the same seed: that speed ratio is for the same work (the
    default's torch resize is pinned against Pillow in test_torch_resize.py)."""
    from benchmarks.bench_data import decode_rates, reference_load_image

    path = save_jpeg(tmp_path / "a.jpg", 500, 375, orientation=orientation)
    for seed in range(6):
        ref = reference_load_image(path, MEAN, STD, torch.Generator().manual_seed(seed))
        today = load_image(path, (224, 224), 3, MEAN, STD, train=True, generator=torch.Generator().manual_seed(seed),
                           fast_jpeg=False, torch_resize=False)
        torch.testing.assert_close(today, ref, rtol=0, atol=1e-6)
    rates = decode_rates([path], repeats=1)
    assert set(rates) >= {"reference_img_per_s", "pillow_img_per_s", "default_img_per_s", "ratio",
                          "torch_vs_pillow_resize"}
