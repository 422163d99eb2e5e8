"""Where samples come from: Fashion-MNIST IDX files, class folders, unlabelled folders, list files.

Each source gives (path, label) pairs (or in-memory uint8 images) and its class names; label -1 = unlabelled.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
INSTALL_HINT = (
    "install it with `apt-get update && apt-get install -y dataset-fashion-mnist`, or pass "
    "`--data.path DIR` with the four .gz files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)"
)
MAX_IDX_BYTES = 16 * 2**30  # an IDX header declaring more is refused before anything is decompressed
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_at_most(f, n: int, chunk: int = 16 * 2**20) -> bytes:
    """Up to n bytes of a file object, read a chunk at a time: memory follows what the file holds, not what its header
    claims (a single read(n) of a gzip stream reserves n bytes first)."""
    parts, got = [], 0
    while got < n:
        part = f.read(min(chunk, n - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_idx(path: str | Path, magic: int | None = None) -> np.ndarray:
    """An IDX file (.gz or raw) as a numpy array; ValueError on a bad magic number or truncated data.

    The header is read first and at most one byte past the size it declares is decompressed: a gzip bomb (or
    trailing garbage) is refused after reading what a real file of that header holds, not all of it.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES:
                raise ValueError(f"{path}: not an IDX file (bad magic number {head[:4].hex() or 'empty file'})")
            (found,) = struct.unpack(">I", head)
            if magic is not None and found != magic:
                raise ValueError(f"{path}: IDX magic number {found}, expected {magic}; is it the right file?")
            ndim = head[3]
            shape = f.read(4 * ndim)
            if len(shape) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header; download the file again")
            dims = struct.unpack(f">{ndim}I", shape)
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            expected = math.prod(dims) * dtype.itemsize
            if expected > MAX_IDX_BYTES:
                raise ValueError(f"{path}: the IDX header declares {dims} ({expected / 2**30:.1f} GiB), more than "
                                 f"{MAX_IDX_BYTES / 2**30:.0f} GiB; is it the right file?")
            body = read_at_most(f, expected + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt, download it again") from e
    if len(body) != expected:
        raise ValueError(
            f"{path}: IDX data is {'only ' + str(len(body)) if len(body) < expected else 'more than ' + str(expected)} "
            f"bytes, the header says {expected} ({'truncated' if len(body) < expected else 'trailing bytes'}); "
            f"download the file again"
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
# Image files: finding them (decoding is in decode.py)
# ---------------------------------------------------------------------------------------------


def check_dir(path: str | Path, flag: str) -> Path:
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


def folder_samples(root: Path, classes: list[str] | None) -> tuple[list[tuple[str, int]], list[str]]:
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
    '#' are ignored. Names are UTF-8; other bytes are kept as the file system's names keep them (surrogateescape).
    A path may contain spaces; a trailing integer is read as the label.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"list file {path} does not exist; pass `--data.path FILE` (one image path per line)")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; --data.source list expects a text file with one image path per line")
    entries: list[tuple[int, str, int | None, str]] = []  # (line number, file, label, last token)
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")  # -sig: drop a BOM
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        label = None
        if len(parts) == 2 and re.fullmatch(r"[+-]?\d+", parts[1]):
            line, label = parts[0], int(parts[1])
            _check_label(path, number, label)
        file = Path(line).expanduser()
        entries.append((number, str(file if file.is_absolute() else path.parent / file), label,
                        parts[-1] if len(parts) == 2 else ""))
    if not entries:
        raise ValueError(f"list file {path} names no images (one path per line, optionally followed by a label)")
    labelled = [e[2] is not None for e in entries]
    if any(labelled) and not all(labelled):
        number, _, _, token = entries[labelled.index(False)]
        if token and not os.path.isfile(entries[labelled.index(False)][1]):
            raise ValueError(f"{path}:{number}: label {token!r} is not an integer; labels are 0, 1, 2, ... "
                             f"(a path with spaces must exist as written)")
        raise ValueError(f"{path}:{number}: no label, but other lines have one; label every line or none")
    return [(file, -1 if label is None else label) for _, file, label, _ in entries]


MAX_LABEL = 1_000_000  # a head with more classes than this is a typo or an id, not a class index


def _check_label(path: Path, number: int, label: int) -> None:
    """Labels are class indices 0..MAX_LABEL: a negative or huge one (an id, a typo) would build a wrong head."""
    if label < 0:
        raise ValueError(f"{path}:{number}: negative label {label}; labels are 0, 1, 2, ...")
    if label > MAX_LABEL:
        raise ValueError(f"{path}:{number}: label {label} is above {MAX_LABEL:,}; labels are class indices "
                         f"0, 1, 2, ... (a label L builds a head of L + 1 classes): renumber the classes")


def file_samples(cfg: DataConfig, split: str) -> tuple[list[tuple[str, int]], list[str], int, list[str]]:
    """(samples, class names, num_classes, missing files skipped) for a file-based source and split."""
    if split == "eval" and not cfg.eval_path:
        raise ValueError(
            f"no evaluation data for --data.source {cfg.source}: pass --data.eval_path "
            f"({'a folder' if cfg.source != 'list' else 'a list file'} of evaluation images)"
        )
    where, flag = (cfg.path, "--data.path") if split == "train" else (cfg.eval_path, "--data.eval_path")
    if cfg.source == "folder":
        root = check_dir(where, flag)
        train_classes = None
        if split == "eval":  # the label space is the training folder's, so eval labels line up
            train_root = Path(cfg.path).expanduser()
            train_classes = _class_folders(train_root) if train_root.is_dir() else None
        samples, classes = folder_samples(root, train_classes)
        return samples, classes, len(classes), []
    if cfg.source == "unlabelled":
        root = check_dir(where, flag)
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
