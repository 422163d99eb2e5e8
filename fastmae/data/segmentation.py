"""Segmentation data: Fashion-MNIST scenes (built-in, offline) and folders of images + PNG label maps.

Shapes: N samples, C channels, H, W image, S scenes, M source items, T = max items per scene.
A split holds its images as an `ImageStore` (generated scenes in memory, or files decoded by the loader's workers)
and its label maps as uint8 (N, H, W) in memory (scenes) or PNG files read with their image; `SegLoader` yields
normalised (B, C, H, W) float32 images and (B, H, W) int64 labels, flipped together in training.

Fashion-MNIST scenes: 2-4 items pasted onto an empty canvas (84x84 by default) at random places; a pixel
belongs to an item where the item's intensity > SCENE_THRESHOLD, later items on top; label 0 is background,
1 + c the Fashion-MNIST class c. Train scenes use only train-split items, evaluation scenes only t10k items;
the layout is a pure function of (seed, split).

Folder layout (ADE20K/VOC style): `--data.path DIR/images` and `--seg.labels DIR/annotations`; the label
map of `images/a/b.jpg` is `annotations/a/b.png` (same relative path and stem). A label map is an 8-bit
index PNG ('P': the palette index is the class) or grayscale PNG ('L': the value is the class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .decode import exif_frame_note, oriented_hw, pillow_pixel_check, warn_exif_turned
from .dense import DenseLoader, DenseSamples, ImageStore, image_sizes, warn_colour_dropped
from .sampler import mix_seed
from .sources import FASHION_MNIST_CLASSES, check_dir, find_images, load_fashion_mnist

SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)
SCENE_THRESHOLD = 32  # uint8 intensity above which a pixel of a pasted item belongs to it
_SPLIT_STREAM = {"train": 0, "eval": 1}


@dataclass
class SegSplit:
    """One split: images (loaded one at a time), label maps (N, H, W) uint8 in memory or one PNG per image
    (`label_files`), a name per sample."""

    images: ImageStore
    masks: torch.Tensor | None
    names: list[str]
    sources: torch.Tensor | None = None  # scenes: (S, T) indices of the pasted items in their split, -1 = none
    label_files: list[str] = field(default_factory=list)
    frame_notes: list[str] = field(default_factory=list)  # per file: why its label map's size may differ

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of every image of the split."""
        return self.images.hw(0)

    def mask(self, i: int) -> torch.Tensor:
        """Label map i (H, W) uint8."""
        if self.masks is not None:
            return self.masks[i]
        note = self.frame_notes[i] if self.frame_notes else ""
        return torch.from_numpy(read_label_map(self.label_files[i], self.images.hw(i), self.names[i], note))

    def subset(self, n: int) -> SegSplit:
        """The first n samples."""
        return SegSplit(self.images.subset(range(min(n, len(self)))), None if self.masks is None else self.masks[:n],
                        self.names[:n], None if self.sources is None else self.sources[:n], self.label_files[:n],
                        self.frame_notes[:n])


def scene_layout(num: int, num_source: int, size: int, item_hw: tuple[int, int], num_items: tuple[int, int],
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the items of `num` scenes go, a pure function of the seed: item counts (S,), source indices (S, T),
    top and left corners (S, T) on a size x size canvas (T = the most items per scene)."""
    lo, hi = num_items
    h, w = item_hw
    if size < max(h, w):
        raise ValueError(f"the scene size must be at least the item size {max(h, w)}, got {size}")
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(lo, hi + 1, (num,), generator=g)  # (S,)
    src = torch.randint(0, num_source, (num, hi), generator=g)  # (S, T)
    top = torch.randint(0, size - h + 1, (num, hi), generator=g)  # (S, T)
    left = torch.randint(0, size - w + 1, (num, hi), generator=g)  # (S, T)
    return count, src, top, left


def make_scenes(
    items: torch.Tensor, labels: torch.Tensor, num: int, size: int = 84, num_items: tuple[int, int] = (2, 4),
    seed: int = 0, threshold: int = SCENE_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste random items (M, 1, h, w) uint8 with labels (M,) onto `num` canvases of size x size.

    Returns images (S, 1, size, size) uint8, label maps (S, size, size) uint8 (0 background, 1 + label)
    and the pasted items' indices (S, T) (-1 where a scene has fewer than T items). Vectorised over scenes.
    """
    hi = num_items[1]
    h, w = items.shape[-2:]
    count, src, top, left = scene_layout(num, len(items), size, (h, w), num_items, seed)
    canvas = torch.zeros(num, size, size, dtype=torch.uint8)  # (S, H, W)
    mask = torch.zeros(num, size, size, dtype=torch.uint8)  # (S, H, W)
    s_idx = torch.arange(num)[:, None, None]  # (S, 1, 1)
    for j in range(hi):
        item = items[src[:, j], 0]  # (S, h, w)
        fg = (item > threshold) & (j < count)[:, None, None]  # (S, h, w)
        rows = (top[:, j, None] + torch.arange(h))[:, :, None]  # (S, h, 1)
        cols = (left[:, j, None] + torch.arange(w))[:, None, :]  # (S, 1, w)
        cls = (labels[src[:, j]] + 1).to(torch.uint8)[:, None, None]  # (S, 1, 1)
        canvas[s_idx, rows, cols] = torch.where(fg, item, canvas[s_idx, rows, cols])
        mask[s_idx, rows, cols] = torch.where(fg, cls, mask[s_idx, rows, cols])
    sources = torch.where(torch.arange(hi)[None, :] < count[:, None], src, -1)  # (S, T)
    return canvas.unsqueeze(1), mask, sources  # (S, 1, H, W), (S, H, W), (S, T)


def fashion_scenes(path: str, split: str, num: int, size: int, num_items: tuple[int, int], seed: int) -> SegSplit:
    """Scenes of one split built from that split's Fashion-MNIST items (train: train files, eval: t10k)."""
    items, labels = load_fashion_mnist(path, "train" if split == "train" else "eval")  # (M, 1, 28, 28), (M,)
    images, masks, sources = make_scenes(items, labels, num, size, num_items, mix_seed(seed, _SPLIT_STREAM[split], 7))
    return SegSplit(ImageStore(memory=list(images)), masks, [f"{split} scene {i}" for i in range(num)], sources)


def label_map_header(path: str | Path, image_hw: tuple[int, int] | None = None, image: str | Path = "",
                     frame_note: str = "") -> None:
    """read_label_map's checks (a readable PNG of mode P, L or 1, of its image's size) from the header alone."""
    read_label_map(path, image_hw, image, frame_note, decode=False)


def read_label_map(path: str | Path, image_hw: tuple[int, int] | None = None, image: str | Path = "",
                   frame_note: str = "", decode: bool = True) -> np.ndarray | None:
    """A label PNG as (H, W) uint8 class indices: 'P' the palette index, 'L' the value ('1': 0/1).

    image_hw: its image's (h, w) as decoded, checked against the label's header before any pixel is decoded
    (a huge label map costs nothing to refuse); image, frame_note: that image's file and why the sizes may
    differ, for that error.
    """
    try:
        with pillow_pixel_check(enabled=False), Image.open(path) as img:  # the size check below is the limit
            if img.mode not in ("P", "L", "1"):
                raise ValueError(
                    f"label map {path} is a mode-{img.mode} image; save it as an index PNG ('P': palette index = "
                    f"class) or a grayscale PNG ('L': value = class)"
                )
            if image_hw is not None and (img.height, img.width) != tuple(image_hw):
                raise ValueError(f"label map {path} is {img.width}x{img.height} (WxH) but its image {image} is "
                                 f"{image_hw[1]}x{image_hw[0]}; a label map must have its image's size{frame_note}")
            return np.array(img).astype(np.uint8) if decode else None  # (H, W)
    except (OSError, SyntaxError, EOFError) as e:  # truncated, not an image (UnidentifiedImageError is an OSError)
        why = ("not an image in a format Pillow reads" if isinstance(e, UnidentifiedImageError)
               else f"{type(e).__name__}: {e}")
        raise ValueError(f"cannot read label map {path}: {why}; save it again as a PNG (mode P or L) of its "
                         f"image's size") from None


def folder_split(images_root: str, labels_root: str, channels: int, flags: tuple[str, str],
                 max_image_pixels: int = 0, upright: bool = True) -> SegSplit:
    """Every image under images_root with its label map under labels_root (same relative path, .png).

    All images of a split must share one size (they are batched at their own size, not resized). upright: images
    are turned by their EXIF orientation and label maps are in that frame (False: both in the stored frame).
    """
    img_dir = check_dir(images_root, flags[0])
    if not labels_root:
        raise ValueError(f"--data.source folder needs label maps: pass {flags[1]} DIR (the label PNG of "
                         f"{img_dir}/x.jpg is DIR/x.png)")
    lbl_dir = check_dir(labels_root, flags[1])
    files = find_images(img_dir)
    if not files:
        raise ValueError(f"no images found under {img_dir}; pass `{flags[0]} DIR` pointing at your images")
    labels, hws, notes, turned = [], [], [], 0
    for f, (stored_hw, orientation) in zip(files, image_sizes(files, max_image_pixels, upright)):
        hw = oriented_hw(stored_hw, orientation, upright)
        turned += upright and orientation != 1
        lbl = lbl_dir / f.relative_to(img_dir).with_suffix(".png")
        if not lbl.is_file():
            raise FileNotFoundError(f"no label map for image {f}: expected {lbl} (same relative path and stem, "
                                    f".png); add it, or remove the image")
        if hws and hw != hws[0]:
            raise ValueError(f"image {f} is {hw[1]}x{hw[0]} (WxH) but {files[0]} is {hws[0][1]}x{hws[0][0]}; "
                             f"segment batches images at their own size: resize or crop all images (and their label "
                             f"maps, nearest-neighbour) to one size")
        note = exif_frame_note(stored_hw, orientation, upright)
        label_map_header(lbl, hw, f, note)
        labels.append(str(lbl))
        hws.append(hw)
        notes.append(note)
    warn_exif_turned(turned, len(files), img_dir, "label maps")
    warn_colour_dropped(files, channels, img_dir)
    store = ImageStore(files, hws, channels=channels, max_image_pixels=max_image_pixels, upright=upright)
    return SegSplit(store, None, [str(f) for f in files], label_files=labels, frame_notes=notes)


def check_labels(split: SegSplit, num_classes: int, ignore_index: int) -> None:
    """ValueError naming the first label map with a value outside 0..num_classes-1 other than ignore_index (each
    map read once, none kept)."""
    for i in range(len(split)):
        mask = split.mask(i)
        bad = mask[(mask >= num_classes) & (mask != ignore_index)]
        if bad.numel():
            v = int(bad.max())
            raise ValueError(
                f"label map of {split.names[i]} has value {v} outside the {num_classes} classes 0..{num_classes - 1}; "
                f"pass --seg.num_classes {v + 1} (or more), or give such pixels the value of --seg.ignore_index "
                f"({ignore_index})"
            )


def infer_num_classes(split: SegSplit, ignore_index: int) -> int:
    """1 + the largest label in the split other than ignore_index (each map read once, none kept)."""
    top = -1
    for i in range(len(split)):
        m = split.mask(i)
        valid = m[m != ignore_index]
        if valid.numel():
            top = max(top, int(valid.max()))
    return top + 1 if top >= 0 else 1


class SegSamples(DenseSamples):
    """Images of a SegSplit at their own size (uint8) with their label maps, flipped together in training."""

    def __init__(self, split: SegSplit, channels: int, hflip: bool):
        self.split, self.channels, self.hflip = split, channels, hflip
        self.images = split.images

    def __len__(self) -> int:
        return len(self.split)

    def sample(self, i: int, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i (C, H, W) uint8 and its label map (H, W) int64."""
        x = self.split.images.load(i).expand(self.channels, -1, -1)
        y = self.split.mask(i).long()
        if g is not None and self.hflip and float(torch.rand((), generator=g)) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y

    @staticmethod
    def collate(targets: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(targets)  # (B, H, W)


class SegLoader(DenseLoader):
    """Batches of (images (B, C, H, W) float32 normalised, labels (B, H, W) int64) of a SegSplit, made in
    `num_workers` worker processes. Training flips image and label map together (probability 0.5, from the sample's
    (seed, epoch, position) seed, so a resumed epoch sees the same batches); evaluation does not augment."""

    def __init__(self, split: SegSplit, *, num_workers: int = 0, **kw):
        """kw: the Loader's (batch_size, train, channels, mean, std, hflip, seed, rank, world_size, ...)."""
        c0 = split.images.memory[0].shape[0] if split.images.memory is not None else split.images.channels
        if c0 not in (1, kw["channels"]):
            raise ValueError(f"cannot turn {c0}-channel images into {kw['channels']} channels")
        samples = SegSamples(split, kw["channels"], kw.get("hflip", True))
        super().__init__(samples, img_size=split.size, num_workers=num_workers, **kw)
        self.split = split


def palette(ignore_index: int = 255) -> torch.Tensor:
    """A fixed (256, 3) uint8 colour table: black background, 10 distinct colours, then a golden-angle hue
    cycle for further classes; ignore_index white."""
    base = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    colours = list(base)
    for i in range(len(base), 256):
        h = (i * 0.618034) % 1.0
        r, gg, b = Image.new("HSV", (1, 1), (int(h * 255), 200, 220)).convert("RGB").getpixel((0, 0))
        colours.append((r, gg, b))
    table = torch.tensor(colours, dtype=torch.uint8)  # (256, 3)
    if 0 <= ignore_index < 256:
        table[ignore_index] = 255
    return table


__all__ = ["SCENE_CLASSES", "SegLoader", "SegSplit", "check_labels", "fashion_scenes", "folder_split",
           "infer_num_classes", "label_map_header", "make_scenes", "palette", "read_label_map"]
