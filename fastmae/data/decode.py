"""Image files -> tensors with Pillow: any mode and band count to the model's channels, EXIF rotation,
a pixel limit against decompression bombs, and errors that say why a file is unreadable and how to go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .transforms import CROP_RATIO, eval_crop_box, normalize, sample_crop_box

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class UnreadableImageError(ValueError):
    """An image file Pillow cannot decode: empty, truncated, not an image at all, or over the pixel limit.

    `reason` is the short why (without the advice), for the log of files --data.skip_corrupt skipped.
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def _single_band(img: Image.Image, path: str) -> Image.Image:
    """One band as mode 'L' (8-bit) or 'F' (in [0, 1]; 16-bit scaled by 65535, not clipped)."""
    if img.mode in _HIGH_BIT_MODES:
        a = np.asarray(img).astype(np.float32)  # (h, w)
        if img.mode != "F":  # 16-bit ('I' is how Pillow may hand 16-bit data back)
            a = np.clip(a / 65535.0, 0.0, 1.0)
        return Image.fromarray(a)
    if len(img.getbands()) != 1:
        raise ValueError(f"{path}: a page has {len(img.getbands())} bands, expected 1 per page")
    return img if img.mode == "L" else img.convert("L")


@contextlib.contextmanager
def _pillow_pixel_check(enabled: bool) -> Iterator[None]:
    """Pillow's own decompression-bomb check on or off for one decode (off: fastmae checks its own limit).

    Pillow reads its limit from a module global, so it is swapped only around the decode (one thread
    per process decodes: DataLoader workers are processes).
    """
    if enabled:
        yield
        return
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _unreadable(path: str, e: BaseException) -> UnreadableImageError:
    """The error for a file Pillow cannot decode: what is wrong with it and how to get past it."""
    if isinstance(e, Image.DecompressionBombError):
        return UnreadableImageError(
            f"image {path} is too large to decode safely: {e} If you trust the file, raise the limit with "
            f"`--data.max_image_pixels N` (N >= its pixel count) or downscale it; or pass --data.skip_corrupt "
            f"to skip such files",
            reason=str(e),
        )
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        why = "the file is empty (0 bytes)"
    elif isinstance(e, UnidentifiedImageError):
        why = "not an image in a format Pillow reads (a renamed or non-image file?)"
    else:
        why = str(e)
    return UnreadableImageError(
        f"cannot read image {path}: {why}; fix or remove the file, or pass --data.skip_corrupt to skip "
        f"unreadable files",
        reason=why,
    )


def _decode_planes(path: str, channels: int, max_image_pixels: int = 0) -> list[Image.Image]:
    """Decode (EXIF-rotated) and convert to `channels` channels, as Pillow images of mode 'L', 'RGB' or 'F'.

    1 channel: grey; 3: RGB (RGBA, P, CMYK, L, 16-bit grey are converted); other counts: the
    image's own bands (e.g. RGBA for 4) or the pages of a multi-page TIFF, one band each.
    Files over max_image_pixels pixels (0 = Pillow's limit) are refused as possible decompression bombs.
    """
    with _pillow_pixel_check(enabled=max_image_pixels <= 0):
        try:
            img = Image.open(path)  # reads the header only
            if 0 < max_image_pixels < img.width * img.height:
                raise Image.DecompressionBombError(
                    f"Image size ({img.width * img.height} pixels) exceeds the limit of {max_image_pixels} pixels."
                )
            img.load()  # decode now, so a truncated file fails here
            pages = getattr(img, "n_frames", 1)
            first = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise _unreadable(path, e) from e
        return _to_channels(img, first, pages, channels, path)


def _to_channels(img: Image.Image, first: Image.Image, pages: int, channels: int, path: str) -> list[Image.Image]:
    """The decoded image (first: its first page, EXIF-rotated) as `channels` planes; see _decode_planes."""
    if channels in (1, 3):
        if first.mode in _HIGH_BIT_MODES:
            return [_single_band(first, path)] * channels  # 16-bit grey, replicated to RGB if needed
        if first.mode == "P" and "transparency" in first.info:
            first = first.convert("RGBA")  # Pillow wants this step for palette transparency
        target = "L" if channels == 1 else "RGB"
        return [first if first.mode == target else first.convert(target)]
    if len(first.getbands()) == channels:
        return [_single_band(band, path) for band in first.split()]
    if pages == channels:
        planes = []
        for i in range(pages):
            img.seek(i)
            planes.append(_single_band(ImageOps.exif_transpose(img), path))
        if len({p.size for p in planes}) != 1:
            raise ValueError(f"{path}: pages differ in size {[p.size for p in planes]}; they must match to stack")
        return planes
    raise ValueError(
        f"{path}: has {len(first.getbands())} band(s) ({first.mode}) and {pages} page(s), but the model expects "
        f"{channels} channels; use images with {channels} bands or a {channels}-page TIFF, "
        f"or --data.channels 1 or 3 to convert"
    )


def _planes_to_tensor(planes: list[Image.Image]) -> torch.Tensor:
    """Pillow planes ('L', 'RGB' 8-bit; 'F' in [0, 1]) -> (C, h, w) float32 in [0, 1]."""
    parts = []
    for p in planes:
        a = torch.from_numpy(np.array(p))  # (h, w) or (h, w, 3)
        a = a.unsqueeze(-1) if a.ndim == 2 else a  # (h, w, c)
        a = a.permute(2, 0, 1)  # (c, h, w)
        parts.append(a.float().div_(255.0) if a.dtype == torch.uint8 else a.float())
    return torch.cat(parts).clamp_(0.0, 1.0)  # (C, h, w)


def decode_image(path: str | Path, channels: int, max_image_pixels: int = 0) -> torch.Tensor:
    """An image file at full size as (C, h, w) float32 in [0, 1], EXIF-rotated, converted to `channels`."""
    return _planes_to_tensor(_decode_planes(str(path), channels, max_image_pixels))


def load_image(
    path: str | Path,
    img_size: tuple[int, int],
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool = False,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
    generator: torch.Generator | None = None,
    max_image_pixels: int = 0,
) -> torch.Tensor:
    """Decode one file and apply the train or eval transform: (C, H, W) float32, normalised.

    Any size works: an image smaller than the crop is upscaled by the resize. Files over max_image_pixels
    pixels (0 = Pillow's limit) raise UnreadableImageError.
    """
    H, W = img_size
    planes = _decode_planes(str(path), channels, max_image_pixels)
    w0, h0 = planes[0].size
    flip = False
    if train:
        top, left, h, w = sample_crop_box(h0, w0, crop_scale, CROP_RATIO, generator)
        flip = hflip and bool(torch.rand((), generator=generator) < 0.5)
    else:
        top, left, h, w = eval_crop_box(h0, w0, H, W)
    if (top, left, h, w, H, W) != (0, 0, h0, w0, h0, w0):  # identity otherwise
        planes = [p.resize((W, H), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)) for p in planes]
    if flip:
        planes = [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in planes]
    return normalize(_planes_to_tensor(planes), mean, std)  # (C, H, W)
