"""Image files -> tensors with Pillow: any mode and band count to the model's channels, EXIF rotation,
a pixel limit against decompression bombs, and errors that say why a file is unreadable and how to go on.

JPEGs whose crop is at least twice the output size are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
scaling, `Image.draft`): the crop box is drawn from the header's size first, so the law of boxes and flips
is unchanged, and the resize still only shrinks. `FAST_JPEG = False` (or `fast_jpeg=False`) decodes every
file at full size, as before.

An 8-bit grey or RGB crop of whole pixels (every training crop of a file decoded at full size) is resized by
torch's uint8 antialiased bicubic kernel: Pillow's filter, vectorised for x86, there ~2x (grey) to ~4.5x (RGB)
faster than Pillow. It crops, then resizes, as torchvision's resized_crop (Pillow's box resize also reads the
pixels just outside the box, so the edge pixels differ). `TORCH_RESIZE = False` (or `torch_resize=False`)
resizes with Pillow only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .transforms import CROP_RATIO, eval_crop_box, normalize, sample_crop_box

log = logging.getLogger(__name__)
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_DCT_SCALES = (8, 4, 2)  # the reductions libjpeg can apply while decoding (Image.draft), largest first
FAST_JPEG = True  # default of load_image(fast_jpeg=...): decode JPEGs at reduced size where the crop allows
# default of load_image(torch_resize=...): torch's uint8 resize kernel is vectorised for AVX2 / AVX-512 only
TORCH_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# EXIF orientation -> (x, y) of the upright image run against the stored image's axes (see ImageOps.exif_transpose)
_REVERSED_AXES = {2: (True, False), 3: (True, True), 4: (False, True), 6: (True, False), 7: (True, True),
                  8: (False, True)}
_SWAPS_AXES = (5, 6, 7, 8)  # orientations that swap width and height

SKIP_HINT = ", or pass --data.skip_corrupt to skip unreadable files"  # the end of every UnreadableImageError's fix
Box = tuple[float, float, float, float]  # top, left, h, w in source pixels


class UnreadableImageError(ValueError):
    """An image file Pillow cannot decode: empty, truncated, not an image at all, or over the pixel limit.

    `reason` is the short why (without the advice), for the log of files --data.skip_corrupt skipped.
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message

    def without_skip_hint(self) -> UnreadableImageError:
        """The same error for a command that cannot skip files (its fix must not name --data.skip_corrupt)."""
        return UnreadableImageError(str(self).replace(SKIP_HINT, ""), self.reason)


def _single_band(img: Image.Image, path: str) -> Image.Image:
    """One band as mode 'L' (8-bit) or 'F' (in [0, 1]; 16-bit scaled by 65535, not clipped)."""
    if img.mode in _HIGH_BIT_MODES:
        a = np.asarray(img).astype(np.float32)  # (h, w)
        if not np.isfinite(a).all():  # a NaN pixel becomes a NaN feature row or a NaN loss, far from its cause
            bad = int((~np.isfinite(a)).sum())
            raise UnreadableImageError(
                f"cannot read image {path}: {bad} pixel{'s' if bad > 1 else ''} NaN or infinite (a float image); fix "
                f"or remove the file{SKIP_HINT}", reason="non-finite pixels")
        if img.mode != "F":  # 16-bit ('I' is how Pillow may hand 16-bit data back)
            a = np.clip(a / 65535.0, 0.0, 1.0)
        return Image.fromarray(a)
    if len(img.getbands()) != 1:
        raise ValueError(f"{path}: a page has {len(img.getbands())} bands, expected 1 per page")
    return img if img.mode == "L" else img.convert("L")


@contextlib.contextmanager
def pillow_pixel_check(enabled: bool) -> Iterator[None]:
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


def _unreadable(path: str, e: BaseException, empty: bool = False) -> UnreadableImageError:
    """The error for a file Pillow cannot decode: what is wrong with it and how to get past it (empty: the bytes
    given for it were none)."""
    if isinstance(e, Image.DecompressionBombError):
        return UnreadableImageError(
            f"image {path} is too large to decode safely: {e} If you trust the file, raise the limit with "
            f"`--data.max_image_pixels N` (N >= its pixel count) or downscale it{SKIP_HINT}",
            reason=str(e),
        )
    if empty or (os.path.isfile(path) and os.path.getsize(path) == 0):
        why = "the file is empty (0 bytes)"
    elif isinstance(e, UnidentifiedImageError):
        why = "not an image in a format Pillow reads (a renamed or non-image file?)"
    else:
        why = str(e)
    return UnreadableImageError(
        f"cannot read image {path}: {why}; fix or remove the file{SKIP_HINT}",
        reason=why,
    )


def _check_regular(path: str) -> None:
    """UnreadableImageError for a path that exists but is not a regular file (a FIFO would block the reader
    forever, a device too)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise UnreadableImageError(
            f"cannot read image {path}: not a regular file (a FIFO, socket, device or folder named like an image); "
            f"remove it{SKIP_HINT}", reason="not a regular file")


def _open_checked(path: str | io.BytesIO, max_image_pixels: int) -> Image.Image:
    """The file opened (header read, nothing decoded), refused over max_image_pixels (0 = Pillow's limit)."""
    img = Image.open(path)  # reads the header only
    if 0 < max_image_pixels < img.width * img.height:
        raise Image.DecompressionBombError(
            f"Image size ({img.width * img.height} pixels) exceeds the limit of {max_image_pixels} pixels."
        )
    return img


def image_header(path: str | Path, max_image_pixels: int = 0) -> tuple[tuple[int, int], int]:
    """(stored (h, w), EXIF orientation) of an image file from its header alone, nothing decoded; the same
    UnreadableImageError as decoding for a file that is not an image or is over the pixel limit."""
    path = str(path)
    _check_regular(path)
    with pillow_pixel_check(enabled=max_image_pixels <= 0):
        try:
            with _open_checked(path, max_image_pixels) as img:
                return (img.height, img.width), _orientation(img)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise _unreadable(path, e) from e


def exif_frame_note(stored_hw: tuple[int, int], orientation: int, upright: bool = True) -> str:
    """The end of an error for an annotation whose size is not its image's: '' when the image is stored upright,
    else the frame it was read in and the flag for the other one."""
    if orientation == 1:
        return ""
    h, w = stored_hw
    if upright:
        return (f" (the image is turned by its EXIF orientation {orientation}; stored, it is {w}x{h}: if the "
                f"annotations follow the stored pixels, pass --data.no_apply_exif_orientation)")
    return (f" (the image is read as stored, its EXIF orientation {orientation} ignored by "
            f"--data.no_apply_exif_orientation: if the annotations follow the upright image, drop that flag)")


def oriented_hw(stored_hw: tuple[int, int], orientation: int, upright: bool = True) -> tuple[int, int]:
    """(h, w) of an image as decoded: turned by its EXIF orientation (upright) or as stored."""
    h, w = stored_hw
    return (w, h) if upright and orientation in _SWAPS_AXES else (h, w)


def _decode_planes(
    path: str, channels: int, max_image_pixels: int = 0, before_load: Callable[[Image.Image], None] | None = None,
    upright: bool = True, data: bytes | None = None,
) -> list[Image.Image]:
    """Decode (EXIF-rotated unless upright=False: the stored pixels) and convert to `channels` channels, as Pillow
    images of mode 'L', 'RGB' or 'F'.

    1 channel: grey; 3: RGB (RGBA, P, CMYK, L, 16-bit grey are converted); other counts: the
    image's own bands (e.g. RGBA for 4) or the pages of a multi-page TIFF, one band each.
    Files over max_image_pixels pixels (0 = Pillow's limit) are refused as possible decompression bombs.
    before_load(img) sees the opened file (header read, size checked) before it is decoded, e.g. to draft.
    data: the file's bytes (a member of a tar shard); `path` then only names it in errors.
    """
    if data is None:
        _check_regular(path)
    with pillow_pixel_check(enabled=max_image_pixels <= 0):
        try:
            img = _open_checked(path if data is None else io.BytesIO(data), max_image_pixels)
            if before_load is not None:
                before_load(img)
            img.load()  # decode now, so a truncated file fails here
            pages = getattr(img, "n_frames", 1)
            first = img if not upright or _orientation(img) == 1 else ImageOps.exif_transpose(img)  # no copy
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise _unreadable(path, e, empty=data is not None and not data) from e
        return _to_channels(img, first, pages, channels, path, upright)


def _to_channels(img: Image.Image, first: Image.Image, pages: int, channels: int, path: str,
                 upright: bool = True) -> list[Image.Image]:
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
            planes.append(_single_band(ImageOps.exif_transpose(img) if upright else img.copy(), path))
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
    if len(planes) == 1 and planes[0].mode in ("L", "RGB"):  # the common case: one conversion, no cat or clamp
        return _uint8_chw(planes[0]).float().div_(255.0)
    parts = []
    for p in planes:
        a = torch.from_numpy(np.array(p))  # (h, w) or (h, w, 3)
        a = a.unsqueeze(-1) if a.ndim == 2 else a  # (h, w, c)
        a = a.permute(2, 0, 1)  # (c, h, w)
        parts.append(a.float().div_(255.0) if a.dtype == torch.uint8 else a.float())
    return torch.cat(parts).clamp_(0.0, 1.0)  # (C, h, w)


def _uint8_chw(plane: Image.Image) -> torch.Tensor:
    """An 8-bit 'L' or 'RGB' Pillow image -> (c, h, w) uint8 (a view of one copy of its pixels)."""
    a = torch.from_numpy(np.array(plane))  # (h, w) or (h, w, 3)
    return a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1)


def _normalized(planes: list[Image.Image], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Planes -> (C, H, W) float32 (pixels / 255 - mean) / std; 8-bit images in one multiply-add from uint8."""
    if _is_8bit(planes):
        return _normalized_uint8(_uint8_chw(planes[0]), mean, std)
    return normalize(_planes_to_tensor(planes), mean, std)


def _is_8bit(planes: list[Image.Image]) -> bool:
    """Whether the planes are one 8-bit grey or RGB image (the common case, kept in uint8 until normalised)."""
    return len(planes) == 1 and planes[0].mode in ("L", "RGB")


def _normalized_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, H, W) uint8 -> float32 (x / 255 - mean) / std in one multiply-add."""
    scale, bias = _uint8_affine(tuple(mean), tuple(std), x.shape[0])
    return torch.addcmul(bias, x.float(), scale)


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., C, H, W) uint8 pixels, on any device -> float32 (x / 255 - mean) / std, bit for bit what load_image
    gives without uint8=True (the same multiply-add)."""
    scale, bias = _uint8_affine(tuple(mean), tuple(std), x.shape[-3])
    return torch.addcmul(bias.to(x.device), x.float(), scale.to(x.device))


@functools.lru_cache(maxsize=16)
def _uint8_affine(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), each (C, 1, 1), with pixel x scale + bias = (pixel / 255 - mean) / std; made once per stats
    (a single mean/std value applies to every channel, as normalize's view(-1, 1, 1) broadcast does)."""
    mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(channels, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)]).view(channels, 1, 1)
    return scale, bias


def decode_image(path: str | Path, channels: int, max_image_pixels: int = 0, upright: bool = True) -> torch.Tensor:
    """An image file at full size as (C, h, w) float32 in [0, 1], EXIF-rotated (upright=False: the stored pixels,
    for annotations made on them), converted to `channels`."""
    return _planes_to_tensor(_decode_planes(str(path), channels, max_image_pixels, upright=upright))


def decode_image_uint8(path: str | Path, channels: int, max_image_pixels: int = 0, upright: bool = True,
                       reduce: int = 1) -> torch.Tensor:
    """decode_image as (C, h, w) uint8: 8-bit images without a float round trip (one copy of Pillow's pixels),
    others rounded from [0, 1] (what the dense tasks' workers send). reduce (2, 4 or 8): a JPEG that libjpeg can
    scale is decoded at 1/reduce of its size (a DCT-domain reduction, far cheaper than decoding and resizing);
    other files at full size, so the caller reads the reduction from the result's size."""

    def draft(img: Image.Image) -> None:
        if reduce > 1 and _can_draft(img, channels):
            _draft(img, reduce)

    planes = _decode_planes(str(path), channels, max_image_pixels, before_load=draft, upright=upright)
    if _is_8bit(planes):
        return _uint8_chw(planes[0])
    return _planes_to_tensor(planes).mul_(255.0).round_().to(torch.uint8)


def decode_annotated(path: str | Path, channels: int, max_image_pixels: int = 0,
                     upright: bool = True) -> tuple[torch.Tensor, tuple[int, int], int]:
    """An image whose annotations are in its pixels (label map, boxes, keypoints): (C, h, w) float32 in [0, 1] as
    decode_image, its stored (h, w) and EXIF orientation (for the annotation checks). Errors name no
    --data.skip_corrupt: a skipped file would leave its annotations without an image."""
    try:
        stored_hw, orientation = image_header(path, max_image_pixels)
        return decode_image(path, channels, max_image_pixels, upright), stored_hw, orientation
    except UnreadableImageError as e:
        raise e.without_skip_hint() from None


def warn_exif_turned(turned: int, total: int, root: str | Path, annotations: str) -> None:
    """Say (once per split) that images with an EXIF orientation were read upright, annotations in that frame."""
    if turned:
        log.warning("%d of %d images under %s carry an EXIF orientation: they are read upright (as displayed) and "
                    "their %s taken in that frame; pass --data.no_apply_exif_orientation if the %s follow the "
                    "stored pixels", turned, total, root, annotations, annotations)


def _orientation(img: Image.Image) -> int:
    """The file's EXIF orientation (1: stored upright); read from the header, no decoding."""
    return int(img.getexif().get(0x0112, 1) or 1)


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of the opened image after EXIF rotation, from the header alone."""
    w, h = img.size
    return (w, h) if _orientation(img) in _SWAPS_AXES else (h, w)


def _can_draft(img: Image.Image, channels: int) -> bool:
    """Whether libjpeg may decode this file at reduced size: a single-image 8-bit grey or RGB JPEG, 1 or 3 channels."""
    return img.format == "JPEG" and img.mode in ("L", "RGB") and channels in (1, 3) and len(img.tile) == 1


def dct_scale(box_hw: tuple[float, float], out_hw: tuple[int, int]) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) after which a crop of box_hw pixels still covers out_hw."""
    return next((s for s in _DCT_SCALES if box_hw[0] / s >= out_hw[0] and box_hw[1] / s >= out_hw[1]), 1)


def _draft(img: Image.Image, scale: int) -> None:
    """Ask libjpeg to decode `img` at 1/scale of its size (scale 8, 4 or 2); Pillow picks exactly that scale."""
    w, h = img.size
    _, reduced = img.draft(img.mode, (w // scale, h // scale))
    if round(w / reduced[2]) != scale:  # cannot happen with Pillow's rule (scale = min(w // (w // s), ...))
        raise RuntimeError(f"JPEG draft chose 1/{w / reduced[2]:g} instead of 1/{scale}")


def _reduced_box(box: Box, scale: int, full_hw: tuple[int, int], orientation: int) -> Box:
    """A crop box of the full-size upright image in the pixels of the upright image decoded at 1/scale.

    Decoded pixel j covers stored pixels [j * scale, (j + 1) * scale); the last one is partial when a side is
    not a multiple of `scale`, and EXIF rotation can put it first: then the box moves by the missing part.
    """
    top, left, h, w = box
    rev_x, rev_y = _REVERSED_AXES.get(orientation, (False, False))
    n_h, n_w = full_hw
    off_y = -(-n_h // scale) * scale - n_h if rev_y else 0
    off_x = -(-n_w // scale) * scale - n_w if rev_x else 0
    return (top + off_y) / scale, (left + off_x) / scale, h / scale, w / scale


def _whole_pixels(box: Box) -> bool:
    """Whether a crop box lies on pixel edges (training crops of a full-size decode; not reduced or eval boxes)."""
    return all(float(v).is_integer() for v in box)


def _resized_crop_uint8(plane: Image.Image, box: Box, out_hw: tuple[int, int]) -> torch.Tensor:
    """Crop a whole-pixel `box` (top, left, h, w) of an 8-bit 'L' or 'RGB' image and resize it to out_hw with
    torch's antialiased bicubic uint8 kernel (Pillow's filter, a = -0.5): (C, H, W) uint8."""
    top, left, h, w = (int(v) for v in box)
    a = torch.from_numpy(np.array(plane.crop((left, top, left + w, top + h))))  # (h, w) or (h, w, C): one copy
    x = (a.unsqueeze(-1) if a.ndim == 2 else a).permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last strides
    return F.interpolate(x, size=out_hw, mode="bicubic", antialias=True, align_corners=False)[0]  # (C, H, W)


def _crop_and_flip(
    hw: tuple[int, int],
    img_size: tuple[int, int],
    train: bool,
    crop_scale: tuple[float, float],
    hflip: bool,
    generator: torch.Generator | None,
) -> tuple[Box, bool]:
    """The crop box (top, left, h, w) in an image of hw pixels and the flip: RandomResizedCrop and a coin to
    train (in this order from `generator`), the centre crop for evaluation."""
    if train:
        box = sample_crop_box(hw[0], hw[1], crop_scale, CROP_RATIO, generator)
        return box, hflip and bool(torch.rand((), generator=generator) < 0.5)
    return eval_crop_box(hw[0], hw[1], img_size[0], img_size[1]), False


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
    fast_jpeg: bool | None = None,
    torch_resize: bool | None = None,
    data: bytes | None = None,
    uint8: bool = False,
) -> torch.Tensor:
    """Decode one file and apply the train or eval transform: (C, H, W) float32, normalised.

    uint8: an 8-bit grey or RGB image comes back as its (C, H, W) uint8 pixels instead, a quarter of the bytes, to be
    normalised where the batch lands (`normalize_uint8`, the same multiply-add); other images are normalised here.

    Any size works: an image smaller than the crop is upscaled by the resize. Files over max_image_pixels
    pixels (0 = Pillow's limit) raise UnreadableImageError. fast_jpeg (None: FAST_JPEG) decodes a JPEG
    at 1/2, 1/4 or 1/8 scale when its crop box still covers img_size there (box drawn from the header).
    torch_resize (None: TORCH_RESIZE) resizes 8-bit crops of whole pixels with torch's uint8 kernel, not Pillow.
    data: the file's bytes (a tar shard's member), decoded instead of reading `path`, which names it in errors.
    """
    H, W = img_size
    fast = FAST_JPEG if fast_jpeg is None else fast_jpeg
    drawn: list[tuple[Box, bool]] = []

    def draft_for_crop(img: Image.Image) -> None:
        """Header read: draw the crop from the full upright size, then draft the largest reduction it allows."""
        if not (fast and _can_draft(img, channels)):
            return
        full_hw = _upright_size(img)
        box, flip = _crop_and_flip(full_hw, img_size, train, crop_scale, hflip, generator)
        scale = dct_scale((box[2], box[3]), (H, W))
        if scale > 1:
            _draft(img, scale)
            box = _reduced_box(box, scale, full_hw, _orientation(img))
        drawn.append((box, flip))

    planes = _decode_planes(str(path), channels, max_image_pixels, draft_for_crop, data=data)
    w0, h0 = planes[0].size
    (top, left, h, w), flip = drawn[0] if drawn else _crop_and_flip((h0, w0), img_size, train, crop_scale, hflip,
                                                                    generator)
    box = (top, left, h, w)
    if (top, left, h, w, H, W) != (0, 0, h0, w0, h0, w0):  # identity otherwise
        if (TORCH_RESIZE if torch_resize is None else torch_resize) and _is_8bit(planes) and _whole_pixels(box):
            x = _resized_crop_uint8(planes[0], box, img_size)  # (C, H, W) uint8
            x = x.flip(-1) if flip else x
            return x if uint8 else _normalized_uint8(x, mean, std)
        planes = [p.resize((W, H), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)) for p in planes]
    if flip:
        planes = [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in planes]
    if uint8 and _is_8bit(planes):
        return _uint8_chw(planes[0])  # (C, H, W) uint8
    return _normalized(planes, mean, std)  # (C, H, W)
