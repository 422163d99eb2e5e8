"""Images -> normalised batches: Fashion-MNIST (IDX), class folders, unlabelled folders, list files.

Shapes: B batch, C channels fed to the model, C0 channels stored, H, W output image (img_size),
h, w source image, N samples in the split.

Two paths, one sampler and one crop geometry (RandomResizedCrop for training, resize + centre crop
at 0.875 for evaluation, both bicubic with Pillow's kernel and antialiasing when shrinking):

- in memory (Fashion-MNIST, or any uint8 tensor): the split stays as (N, C0, h, w) uint8 and each
  batch is cropped, resized and flipped at once in the main process by two batched matrix
  products (separable resampling); no worker processes.
- files (folder, unlabelled, list): Pillow decodes each file in DataLoader workers and crops and
  resizes it in one `Image.resize(box=...)`.

Determinism: the order of an epoch comes from (seed, epoch) and each sample's augmentation from
(seed, epoch, its position in the epoch); both are computed in the main process and handed to the
workers with the sample index, so `set_epoch(epoch, start_batch)` replays exactly the batches of an
uninterrupted run, whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
EVAL_CROP_PCT = 0.875  # evaluation: resize to img_size / 0.875, then centre crop (224 <- 256)
INSTALL_HINT = (
    "install it with `apt-get update && apt-get install -y dataset-fashion-mnist`, or pass "
    "`--data.path DIR` with the four .gz files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)"
)
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class UnreadableImageError(ValueError):
    """An image file Pillow cannot decode: empty, truncated, not an image at all, or over the pixel limit.

    `reason` is the short why (without the advice), for the log of files --data.skip_corrupt skipped.
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


# ---------------------------------------------------------------------------------------------
# Pure helpers: crop geometry, resampling, normalisation
# ---------------------------------------------------------------------------------------------


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n RandomResizedCrop boxes (top, left, h, w) as int64 (n, 4), drawn at once.

    Same rule as torchvision: up to 10 tries of an area in scale x image area and a log-uniform
    aspect ratio; the first try that fits wins; if none fits, the centre crop clamped to `ratio`.
    """
    tries = 10
    area = height * width
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)  # (n, tries)
    log_ratio = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = (target * aspect).sqrt().round().long()  # (n, tries)
    h = (target / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # (n, 1): index of the first try that fits
    h = h.gather(1, first).squeeze(1)  # (n,)
    w = w.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, generator=generator)  # uniform position among the valid offsets
    top = (u[:, 0] * (height - h + 1).clamp(min=1)).long().clamp(max=(height - h).clamp(min=0))
    left = (u[:, 1] * (width - w + 1).clamp(min=1)).long().clamp(max=(width - w).clamp(min=0))
    boxes = torch.stack([top, left, h, w], 1)  # (n, 4)
    fallback = torch.tensor(_fallback_box(height, width, ratio))
    return torch.where(fits.any(1, keepdim=True), boxes, fallback)


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """One RandomResizedCrop box (top, left, h, w) inside a height x width image."""
    top, left, h, w = sample_crop_boxes(1, height, width, scale, ratio, generator)[0].tolist()
    return top, left, h, w


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback when no try fits: the largest centred box with aspect ratio in `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def eval_crop_box(height: int, width: int, out_h: int, out_w: int) -> tuple[float, float, float, float]:
    """(top, left, h, w) of 'resize so the image covers out / 0.875, then centre crop out', in source pixels.

    An image already out_h x out_w is left alone (the whole image, no resampling).
    """
    if (height, width) == (out_h, out_w):
        return 0.0, 0.0, float(height), float(width)
    s = max(out_h / EVAL_CROP_PCT / height, out_w / EVAL_CROP_PCT / width)  # resize factor
    h, w = out_h / s, out_w / s
    return (height - h) / 2, (width - w) / 2, h, w


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with Pillow's a = -0.5; zero for |t| >= 2."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1  # |t| <= 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # 1 < |t| < 2
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros((), dtype=t.dtype)))


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """(B, n_out, n_in) weights taking [start, start + length) of an axis to n_out pixels, like Pillow.

    The kernel is stretched by the shrink factor when shrinking (antialiasing); taps outside the
    image are dropped and the rest renormalised, as Pillow's resize does. Only the T taps under
    the kernel are evaluated, then scattered into the dense matrix.
    """
    scale = length / n_out  # (B,) source pixels per output pixel
    support = scale.clamp(min=1.0)[:, None, None]  # (B, 1, 1) kernel stretch
    centre = start[:, None] + (torch.arange(n_out) + 0.5) * scale[:, None]  # (B, n_out), edge coordinates
    taps = math.ceil(4 * float(support.max())) + 2  # T: covers the kernel's 4 * support width
    first = (centre - 0.5 - 2 * support[..., 0]).floor().long()  # (B, n_out) leftmost tap
    idx = first.unsqueeze(-1) + torch.arange(taps)  # (B, n_out, T)
    w = _cubic((idx + 0.5 - centre.unsqueeze(-1)) / support)  # (B, n_out, T)
    w = w * ((idx >= 0) & (idx < n_in))  # drop taps outside the image
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-8)
    out = torch.zeros(len(start), n_out, n_in)
    return out.scatter_add_(2, idx.clamp(0, n_in - 1), w)  # (B, n_out, n_in)


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop box (top, left, h, w) of each image in [0, 1], resize it bicubically to size, mirror where flip.

    images (B, C, h, w) float, boxes (B, 4) (fractional boxes allowed), flip (B,) bool -> (B, C, H, W).
    Separable: two batched matrix products. A crop smaller than `size` is upscaled.
    """
    H, W = size
    boxes = boxes.to(torch.float32)
    wy = _resample_matrix(boxes[:, 0], boxes[:, 2], images.shape[-2], H)  # (B, H, h)
    wx = _resample_matrix(boxes[:, 1], boxes[:, 3], images.shape[-1], W)  # (B, W, w)
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)  # mirrored output columns
    out = wy.unsqueeze(1) @ images @ wx.unsqueeze(1).transpose(-1, -2)  # (B, C, H, W)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots at edges; Pillow clips the same way for 8-bit


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., C, H, W) pixels in [0, 1] -> (pixels - mean) / std per channel."""
    mean_t, std_t = _channel_stats(images, mean, std)
    return (images - mean_t) / std_t


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo `normalize`: (..., C, H, W) normalised -> pixel values in [0, 1] (not clamped)."""
    mean_t, std_t = _channel_stats(images, mean, std)
    return images * std_t + mean_t


def _channel_stats(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, ...]:
    """mean and std as (C, 1, 1) tensors on the images' device and dtype."""
    kw = dict(dtype=images.dtype, device=images.device)
    return torch.tensor(mean, **kw).view(-1, 1, 1), torch.tensor(std, **kw).view(-1, 1, 1)


def _mix(*values: int) -> int:
    """A 63-bit seed from (seed, epoch, stream): well spread even for neighbouring inputs."""
    state = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


_ORDER, _AUGMENT = 0, 1  # independent random streams per epoch


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# ---------------------------------------------------------------------------------------------


def read_idx(path: str | Path, magic: int | None = None) -> np.ndarray:
    """An IDX file (.gz or raw) as a numpy array; ValueError on a bad magic number or truncated data."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt, download it again") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty file'})")
    (found,) = struct.unpack(">I", data[:4])
    if magic is not None and found != magic:
        raise ValueError(f"{path}: IDX magic number {found}, expected {magic}; is it the right file?")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header; download the file again")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(dims) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(
            f"{path}: IDX data is {len(body)} bytes, the header says {expected} "
            f"({'truncated' if len(body) < expected else 'trailing bytes'}); download the file again"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(path: str | Path, split: Literal["train", "eval"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (or MNIST) from its IDX files: images (N, 1, 28, 28) uint8, labels (N,) int64."""
    root = Path(path).expanduser()
    prefix = "train" if split == "train" else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"Fashion-MNIST file {candidates[0]} not found; {INSTALL_HINT}")
        files.append(found)
    images = read_idx(files[0], magic=2051)  # (N, h, w)
    labels = read_idx(files[1], magic=2049)  # (N,)
    if len(images) != len(labels):
        raise ValueError(f"{files[0]} holds {len(images)} images but {files[1]} {len(labels)} labels")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))  # (N, 1, h, w)


# ---------------------------------------------------------------------------------------------
# Image files: finding them and decoding them
# ---------------------------------------------------------------------------------------------


def _check_dir(path: str | Path, flag: str) -> Path:
    """The folder at path, or a FileNotFoundError / ValueError / PermissionError saying how to fix it."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist; pass `{flag} DIR` pointing at your images")
    if not root.is_dir():
        raise ValueError(f"{root} is a file, expected a folder of images; pass `{flag} DIR`")
    if not os.access(root, os.R_OK | os.X_OK):
        raise PermissionError(f"cannot read folder {root} (permission denied); fix its permissions (chmod)")
    return root


def find_images(root: str | Path) -> list[Path]:
    """Every image file under root, recursively, sorted; extensions in IMAGE_EXTENSIONS (any case).

    Hidden files and folders (names starting with '.', e.g. macOS '._x.jpg') are ignored;
    symlinked folders are followed once.
    """
    root = Path(root)

    def raise_unreadable(err: OSError) -> None:
        raise PermissionError(f"cannot read folder {err.filename} ({err.strerror}); fix its permissions") from err

    found, seen = [], set()
    for folder, dirs, files in os.walk(root, onerror=raise_unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / f for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _class_folders(root: Path) -> list[str]:
    """Sorted names of the (non-hidden) subfolders of root: the classes of an ImageNet-style folder."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_samples(root: Path, classes: list[str] | None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image in root/<class>/**; labels index `classes` (default: root's own)."""
    own = _class_folders(root)
    if not own:
        raise ValueError(
            f"{root} has no class subfolders; --data.source folder expects {root}/<class>/<image> "
            f"(for images without labels use --data.source unlabelled)"
        )
    classes = classes or own
    unknown = sorted(set(own) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders {unknown} that the training folder lacks (classes: {classes})")
    samples = []
    for name in own:
        images = find_images(root / name)
        if not images:
            raise ValueError(
                f"class folder {root / name} contains no images (searched for {', '.join(IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder"
            )
        samples += [(str(p), classes.index(name)) for p in images]
    return samples, classes


def read_list(path: str | Path) -> list[tuple[str, int]]:
    """(path, label) per line of a list file: 'image [label]'; label -1 when no line has one.

    Relative paths are relative to the list file's folder; blank lines and lines starting with
    '#' are ignored. A path may contain spaces; a trailing integer is read as the label.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"list file {path} does not exist; pass `--data.path FILE` (one image path per line)")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; --data.source list expects a text file with one image path per line")
    entries: list[tuple[int, str, int | None]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        label = None
        if len(parts) == 2 and re.fullmatch(r"[+-]?\d+", parts[1]):
            line, label = parts[0], int(parts[1])
            if label < 0:
                raise ValueError(f"{path}:{number}: negative label {label}; labels are 0, 1, 2, ...")
        file = Path(line).expanduser()
        entries.append((number, str(file if file.is_absolute() else path.parent / file), label))
    if not entries:
        raise ValueError(f"list file {path} names no images (one path per line, optionally followed by a label)")
    labelled = [e[2] is not None for e in entries]
    if any(labelled) and not all(labelled):
        number = entries[labelled.index(False)][0]
        raise ValueError(f"{path}:{number}: no label, but other lines have one; label every line or none")
    return [(file, -1 if label is None else label) for _, file, label in entries]


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


def _decode_planes(path: str, channels: int, max_pixels: int = 0) -> list[Image.Image]:
    """Decode (EXIF-rotated) and convert to `channels` channels, as Pillow images of mode 'L', 'RGB' or 'F'.

    1 channel: grey; 3: RGB (RGBA, P, CMYK, L, 16-bit grey are converted); other counts: the
    image's own bands (e.g. RGBA for 4) or the pages of a multi-page TIFF, one band each.
    Files over max_pixels pixels (0 = Pillow's limit) are refused as possible decompression bombs.
    """
    with _pillow_pixel_check(enabled=max_pixels <= 0):
        try:
            img = Image.open(path)  # reads the header only
            if 0 < max_pixels < img.width * img.height:
                raise Image.DecompressionBombError(
                    f"Image size ({img.width * img.height} pixels) exceeds the limit of {max_pixels} pixels."
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


def decode_image(path: str | Path, channels: int, max_pixels: int = 0) -> torch.Tensor:
    """An image file at full size as (C, h, w) float32 in [0, 1], EXIF-rotated, converted to `channels`."""
    return _planes_to_tensor(_decode_planes(str(path), channels, max_pixels))


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
    max_pixels: int = 0,
) -> torch.Tensor:
    """Decode one file and apply the train or eval transform: (C, H, W) float32, normalised.

    Any size works: an image smaller than the crop is upscaled by the resize. Files over max_pixels
    pixels (0 = Pillow's limit) raise UnreadableImageError.
    """
    H, W = img_size
    planes = _decode_planes(str(path), channels, max_pixels)
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


# ---------------------------------------------------------------------------------------------
# Sampling: which samples each rank sees, in which order
# ---------------------------------------------------------------------------------------------


class EpochSampler:
    """DistributedSampler's split of an epoch into batches for one rank, as a pure function of the epoch.

    The order (shuffled from (seed, epoch) when `shuffle`) is padded by wrapping around to a
    multiple of world_size; rank r takes positions r, r + world_size, ...; `drop_last` drops the
    rank's incomplete last batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
    ):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(num_samples / world_size)
        self.total = self.per_rank * world_size  # padded epoch length over all ranks
        if drop_last and self.per_rank < batch_size:
            log.warning(
                "only %d samples per rank, fewer than the batch size %d: keeping the partial batch "
                "(lower the batch size to silence this)", self.per_rank, batch_size,
            )
            drop_last = False
        self.num_batches = self.per_rank // batch_size if drop_last else math.ceil(self.per_rank / batch_size)

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, positions): this rank's sample indices for the epoch, in order, and their global positions."""
        n = self.num_samples
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, _ORDER))
            order = torch.randperm(n, generator=g)  # (N,)
        else:
            order = torch.arange(n)
        order = order.repeat(math.ceil(self.total / n))[: self.total]  # (total,), padded by wrapping around
        positions = torch.arange(self.rank, self.total, self.world_size)[: self.num_batches * self.batch_size]
        return order[positions], positions

    def batch_slices(self, start_batch: int = 0) -> Iterator[slice]:
        """Slices of `order()` output, one per batch, from start_batch on."""
        for b in range(start_batch, self.num_batches):
            yield slice(b * self.batch_size, (b + 1) * self.batch_size)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


class Loader:
    """Iterable of (images (B, C, H, W) float32 normalised, labels (B,) int64; -1 = unlabelled) for one rank.

    Call `set_epoch(epoch)` before each epoch (as with DistributedSampler); `set_epoch(epoch, k)`
    resumes an epoch at batch k with exactly the batches an uninterrupted run would see.
    """

    def __init__(
        self,
        sampler: EpochSampler,
        *,
        img_size: tuple[int, int],
        train: bool,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float],
        hflip: bool,
        seed: int,
        num_classes: int,
        classes: Sequence[str] = (),
    ):
        _check_norm(channels, mean, std)
        _check_crop_scale(crop_scale)
        self._sampler = sampler
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.batch_size = sampler.batch_size
        self.train = train
        self.channels = channels
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.crop_scale, self.hflip, self.seed = crop_scale, hflip, seed
        self.num_classes = num_classes
        self.classes = list(classes)
        self.num_samples = sampler.num_samples
        self.skipped: list[str] = []
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (order and augmentation) and the batch to start from for the next iterations."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(self)}]")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self._sampler.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _note_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Record files a dataset skipped, warning once per file."""
        for path, reason in skipped:
            if path not in self.skipped:
                self.skipped.append(path)
                log.warning("skipped unreadable image %s (--data.skip_corrupt): %s", path, reason)


class MemoryLoader(Loader):
    """A split held in memory as uint8 (N, C0, h, w), augmented a batch at a time in the main process.

    C0 must be 1 (replicated to any C) or C. Fast: ~60k Fashion-MNIST-size training images/s on one core.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        img_size: tuple[int, int],
        batch_size: int,
        train: bool,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        num_classes: int = 0,
        classes: Sequence[str] = (),
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, h, w), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] not in (1, channels):
            raise ValueError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        sampler = EpochSampler(
            len(images), batch_size, shuffle=train, seed=seed, rank=rank, world_size=world_size,
            drop_last=train if drop_last is None else drop_last,
        )
        super().__init__(
            sampler, img_size=img_size, train=train, channels=channels, mean=mean, std=std,
            crop_scale=crop_scale, hflip=hflip, seed=seed, num_classes=num_classes, classes=classes,
        )
        self.images = images
        self.labels = labels.long()
        self._mean = torch.tensor(self.mean).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self._std = torch.tensor(self.std).view(1, -1, 1, 1)
        self._pin = torch.cuda.is_available()

    def _augmentation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop boxes (total, 4) and flips (total,) for every position of the epoch, from (seed, epoch)."""
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, _AUGMENT))
        h, w = self.images.shape[-2:]
        boxes = sample_crop_boxes(self._sampler.total, h, w, self.crop_scale, CROP_RATIO, g)  # (total, 4)
        flips = torch.rand(self._sampler.total, generator=g) < 0.5  # (total,)
        return boxes, flips & self.hflip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, positions = self._sampler.order(self.epoch)
        h, w = self.images.shape[-2:]
        if self.train:
            boxes, flips = self._augmentation(self.epoch)
        elif (h, w) != self.img_size:
            boxes = torch.tensor(eval_crop_box(h, w, *self.img_size)).expand(self._sampler.total, 4)
            flips = None
        for sl in self._sampler.batch_slices(self.start_batch):
            idx, pos = indices[sl], positions[sl]
            x = self.images[idx].float().div_(255.0)  # (B, C0, h, w)
            if self.train or (h, w) != self.img_size:
                x = resized_crop(x, boxes[pos], self.img_size, None if flips is None else flips[pos])  # (B, C0, H, W)
            x = (x.expand(-1, self.channels, -1, -1) - self._mean).div_(self._std)  # (B, C, H, W)
            y = self.labels[idx]
            if self._pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y


_Item = tuple[torch.Tensor | None, int, tuple[tuple[str, str], ...], ValueError | None]  # image, label, skipped, error
_Batch = tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]], ValueError | None]


class ImageFiles(Dataset):
    """Image files with labels; item (index, augmentation seed) -> (image (C, H, W), label, skipped files, error).

    With skip_corrupt an unreadable file is replaced by the next readable one (deterministically)
    and reported in the third element, so the main process learns of it even from a worker. A file
    that stops the run comes back as the error (image None) for the main process to raise: raised
    in a worker, it would reach the user wrapped in the worker's traceback instead of one clear line.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        *,
        img_size: tuple[int, int],
        train: bool,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float],
        hflip: bool,
        skip_corrupt: bool,
        max_pixels: int = 0,
    ):
        self.samples = list(samples)
        self.img_size, self.train, self.channels = img_size, train, channels
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_scale, self.hflip, self.skip_corrupt = crop_scale, hflip, skip_corrupt
        self.max_pixels = max_pixels
        self._bad: set[int] = set()  # per process: files already found unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> _Item:
        index, seed = key
        skipped = []
        n = len(self.samples)
        for i in (j % n for j in range(index, index + n)):
            if i in self._bad:
                continue
            path, label = self.samples[i]
            g = torch.Generator().manual_seed(seed)
            try:
                x = load_image(
                    path, self.img_size, self.channels, self.mean, self.std, self.train,
                    self.crop_scale, self.hflip, g, self.max_pixels,
                )
            except ValueError as e:  # UnreadableImageError, or a file the model cannot take (band count)
                if not (self.skip_corrupt and isinstance(e, UnreadableImageError)):
                    return None, label, tuple(skipped), e
                self._bad.add(i)
                skipped.append((path, e.reason))
                continue
            return x, label, tuple(skipped), None
        error = ValueError(
            f"none of the {n} image files could be read (first: {self.samples[0][0]}); "
            f"the warnings above list them: fix or replace the files"
        )
        return None, -1, tuple(skipped), error


def _collate(items: list[_Item]) -> _Batch:
    """Stack images (B, C, H, W) and labels (B,); gather the skipped files and the first error (then no batch)."""
    skipped = [s for _, _, sk, _ in items for s in sk]
    error = next((e for _, _, _, e in items if e is not None), None)
    if error is not None:
        return None, None, skipped, error
    images = torch.stack([x for x, _, _, _ in items])  # (B, C, H, W)
    labels = torch.tensor([y for _, y, _, _ in items], dtype=torch.int64)  # (B,)
    return images, labels, skipped, None


class _EpochBatches:
    """The DataLoader's batch_sampler: lists of (index, augmentation seed) for the selected epoch.

    Holds its own copy of the epoch state rather than a reference to the loader: a reference
    cycle through a DataLoader with persistent workers makes its clean-up take 5 s per worker.
    """

    def __init__(self, sampler: EpochSampler, seed: int):
        self.sampler, self.seed = sampler, seed
        self.epoch, self.start_batch = 0, 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices, positions = self.sampler.order(self.epoch)
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, _AUGMENT))
        seeds = torch.randint(0, 2**62, (self.sampler.total,), generator=g)[positions]  # one seed per position
        for sl in self.sampler.batch_slices(self.start_batch):
            yield list(zip(indices[sl].tolist(), seeds[sl].tolist()))

    def __len__(self) -> int:
        return self.sampler.num_batches - self.start_batch


class FileLoader(Loader):
    """Image files decoded by Pillow in `num_workers` DataLoader workers (persistent, pinned on CUDA)."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        *,
        img_size: tuple[int, int],
        batch_size: int,
        train: bool,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
        num_workers: int = 0,
        skip_corrupt: bool = False,
        max_image_pixels: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        num_classes: int = 0,
        classes: Sequence[str] = (),
    ):
        if num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {num_workers}")
        sampler = EpochSampler(
            len(samples), batch_size, shuffle=train, seed=seed, rank=rank, world_size=world_size,
            drop_last=train if drop_last is None else drop_last,
        )
        super().__init__(
            sampler, img_size=img_size, train=train, channels=channels, mean=mean, std=std,
            crop_scale=crop_scale, hflip=hflip, seed=seed, num_classes=num_classes, classes=classes,
        )
        self.dataset = ImageFiles(
            samples, img_size=img_size, train=train, channels=channels, mean=self.mean, std=self.std,
            crop_scale=crop_scale, hflip=hflip, skip_corrupt=skip_corrupt, max_pixels=max_image_pixels,
        )
        self.num_workers = num_workers
        self._batches = _EpochBatches(sampler, seed)
        self._loader: DataLoader | None = None  # made on first use, so workers start only when needed

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self._batches.epoch, self._batches.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=self._batches,
                num_workers=self.num_workers,
                collate_fn=_collate,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=self.num_workers > 0,
            )
        for images, labels, skipped, error in self._loader:
            self._note_skipped(skipped)
            if error is not None:
                raise error
            yield images, labels


# ---------------------------------------------------------------------------------------------
# build_loader: DataConfig -> Loader
# ---------------------------------------------------------------------------------------------


def _check_norm(channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    """ValueError unless mean and std have one positive-std entry per channel."""
    if len(mean) != channels:
        raise ValueError(f"--data.mean has {len(mean)} values but the model takes {channels} channels")
    if len(std) != channels:
        raise ValueError(f"--data.std has {len(std)} values but the model takes {channels} channels")
    if any(s <= 0 for s in std):
        raise ValueError(f"--data.std must be positive, got {tuple(std)}")


def _check_crop_scale(scale: tuple[float, float]) -> None:
    """ValueError unless 0 < scale[0] <= scale[1] <= 1."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"--data.crop_scale must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")


def _norm_stats(cfg: DataConfig, channels: int, default_mean: tuple, default_std: tuple) -> tuple[tuple, tuple]:
    """cfg.mean/std if given, else the source's defaults, replicated when they are per grey channel."""
    mean = tuple(cfg.mean) or (default_mean if len(default_mean) == channels else default_mean[:1] * channels)
    std = tuple(cfg.std) or (default_std if len(default_std) == channels else default_std[:1] * channels)
    _check_norm(channels, mean, std)
    return mean, std


def _file_samples(cfg: DataConfig, split: str) -> tuple[list[tuple[str, int]], list[str], int, list[str]]:
    """(samples, class names, num_classes, missing files skipped) for a file-based source and split."""
    if split == "eval" and not cfg.eval_path:
        raise ValueError(
            f"no evaluation data for --data.source {cfg.source}: pass --data.eval_path "
            f"({'a folder' if cfg.source != 'list' else 'a list file'} of evaluation images)"
        )
    where, flag = (cfg.path, "--data.path") if split == "train" else (cfg.eval_path, "--data.eval_path")
    if cfg.source == "folder":
        root = _check_dir(where, flag)
        train_classes = None
        if split == "eval":  # the label space is the training folder's, so eval labels line up
            train_root = Path(cfg.path).expanduser()
            train_classes = _class_folders(train_root) if train_root.is_dir() else None
        samples, classes = _folder_samples(root, train_classes)
        return samples, classes, len(classes), []
    if cfg.source == "unlabelled":
        root = _check_dir(where, flag)
        files = find_images(root)
        if not files:
            raise ValueError(
                f"no images found under {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}); "
                f"add images there or pass `{flag} DIR` pointing at your images"
            )
        return [(str(p), -1) for p in files], [], 0, []
    if cfg.source == "list":
        samples = read_list(where)
        missing = [p for p, _ in samples if not os.path.isfile(p)]
        if missing and not cfg.skip_corrupt:
            raise FileNotFoundError(
                f"{len(missing)} file(s) named in {where} do not exist, e.g. {missing[:3]}; fix the list "
                f"or pass --data.skip_corrupt to skip them"
            )
        gone = set(missing)
        samples = [s for s in samples if s[0] not in gone]
        if not samples:
            raise ValueError(f"none of the files named in {where} exist")
        labels = [y for _, y in samples]
        if split == "eval" and os.path.isfile(cfg.path):  # share the training list's label space
            labels += [y for _, y in read_list(cfg.path)]
        return samples, [], max(labels) + 1, missing
    raise ValueError(f"unknown --data.source {cfg.source!r}; choose fashion-mnist, folder, unlabelled or list")


def build_loader(
    cfg: DataConfig,
    split: Literal["train", "eval"],
    img_size: tuple[int, int],
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool | None = None,
) -> Loader:
    """The loader for a split: train=True augments (random resized crop, flip), False resizes and centre-crops.

    drop_last defaults to `train`. With world_size > 1 each rank gets a disjoint shard of the
    epoch. Images of any size and aspect ratio work; smaller ones are upscaled by the resize.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    img_size = (int(img_size), int(img_size)) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    if min(img_size) <= 0:
        raise ValueError(f"image size must be positive, got {img_size}")
    if cfg.channels < 0:
        raise ValueError(f"--data.channels must be >= 0 (0 = the source's own), got {cfg.channels}")
    _check_crop_scale(cfg.crop_scale)
    common = dict(
        img_size=img_size, batch_size=batch_size, train=train, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
        seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
    )
    if cfg.source == "fashion-mnist":
        images, labels = load_fashion_mnist(cfg.path, split)  # (N, 1, 28, 28), (N,)
        if cfg.limit > 0:
            images, labels = images[: cfg.limit], labels[: cfg.limit]
        channels = cfg.channels or 1
        mean, std = _norm_stats(cfg, channels, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        num_classes = max(len(FASHION_MNIST_CLASSES), int(labels.max()) + 1 if len(labels) else 0)
        return MemoryLoader(
            images, labels, channels=channels, mean=mean, std=std,
            num_classes=num_classes, classes=FASHION_MNIST_CLASSES, **common,
        )
    samples, classes, num_classes, missing = _file_samples(cfg, split)
    if cfg.limit > 0:
        samples = samples[: cfg.limit]
    channels = cfg.channels or 3
    mean, std = _norm_stats(
        cfg, channels, *((IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,)))
    )
    loader = FileLoader(
        samples, channels=channels, mean=mean, std=std, num_workers=cfg.num_workers,
        skip_corrupt=cfg.skip_corrupt, max_image_pixels=cfg.max_image_pixels, num_classes=num_classes,
        classes=classes, **common,
    )
    loader._note_skipped([(p, "file does not exist") for p in missing])
    return loader


__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "EpochSampler",
    "FileLoader",
    "ImageFiles",
    "Loader",
    "MemoryLoader",
    "UnreadableImageError",
    "build_loader",
    "decode_image",
    "denormalize",
    "eval_crop_box",
    "find_images",
    "load_fashion_mnist",
    "load_image",
    "normalize",
    "read_idx",
    "read_list",
    "resized_crop",
    "sample_crop_box",
    "sample_crop_boxes",
]
