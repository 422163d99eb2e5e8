"""Detection data: Fashion-MNIST scenes with one box per pasted item (built-in, offline) and COCO instances files.

Shapes: N images, n boxes of one image, C channels, H, W canvas (--model.img_size), h, w an image's own size.
Boxes are (n, 4) float32 x1 y1 x2 y2 in an image's own pixels; labels (n,) int64 are contiguous class indices
0..K-1, and `category_ids` maps them back to the file's own (arbitrary) COCO category ids. A split holds file
paths and sizes (read from the headers), not pixels (data/dense.py); the loader's workers decode each image and
letterbox it onto the canvas (resize keeping the aspect ratio so it fits, pad bottom/right with the mean colour;
in training a random smaller scale at a random place, and a horizontal flip), boxes mapped with it.

COCO instances layout: {"images": [{"id", "file_name", "width"?, "height"?}], "annotations": [{"image_id",
"category_id", "bbox": [x, y, w, h], "iscrowd"?}], "categories": [{"id", "name"}]}. Ids are any integers; crowd
annotations are left out of training (COCOeval ignores them when scoring); an image without annotations is a
negative example.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .build import holdout_indices
from .coco_json import (box_outside, check_ids, check_images, coco_image_size, coco_subset, entry_hw, fail,
                        read_coco_json)
from .decode import warn_exif_turned
from .dense import DenseLoader, DenseSamples, ImageStore, warn_colour_dropped
from .sampler import mix_seed
from .segmentation import scene_layout
from .sources import FASHION_MNIST_CLASSES, check_dir, load_fashion_mnist

log = logging.getLogger(__name__)

SCENE_THRESHOLD = 32  # uint8 intensity above which a pasted item's pixel is visible (as in segmentation)
HOLDOUT_SHARE = 6  # held-out scenes paste 1/6 of the training items (10,000 of 60,000, the size of t10k)


@dataclass
class DetSplit:
    """One split: its images (files or generated scenes, loaded one at a time), their boxes and class indices, COCO
    ids and names."""

    images: ImageStore
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    image_ids: list[int]
    names: list[str]
    classes: list[str]
    category_ids: list[int]
    coco: dict = field(default_factory=dict)  # the ground truth as a COCO instances dict (what COCOeval reads)


# ---------------------------------------------------------------------------------------------------
# Boxes.


def letterbox_scale(h: int, w: int, H: int, W: int) -> float:
    """The scale that fits an h x w image into an H x W canvas keeping its aspect ratio."""
    return min(H / h, W / w)


def map_boxes(boxes: torch.Tensor, scale: float, dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
    """(n, 4) xyxy boxes of the image -> the canvas where it was scaled by `scale` and placed at (dx, dy)."""
    return boxes * scale + torch.tensor([dx, dy, dx, dy], dtype=boxes.dtype)


def unmap_boxes(boxes: torch.Tensor, scale: float, h: int, w: int, dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
    """Canvas boxes (n, 4) -> the image's own pixels, clipped to it (the inverse of map_boxes)."""
    out = (boxes - torch.tensor([dx, dy, dx, dy], dtype=boxes.dtype)) / scale
    return torch.stack([out[:, 0].clamp(0, w), out[:, 1].clamp(0, h), out[:, 2].clamp(0, w), out[:, 3].clamp(0, h)], 1)


def flip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Boxes (n, 4) of an image flipped left-right, `width` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(n, 4) xyxy -> COCO's [x, y, w, h]."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)


def detection_records(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, scale: float,
                      hw: tuple[int, int], category_ids: Sequence[int]) -> list[dict]:
    """One image's decoded detections on the canvas (n, 4) xyxy, (n,), (n,) class indices -> COCO results fields
    in the image's own pixels: {'category_id', 'bbox' [x, y, w, h], 'score'}; boxes left empty by the clip to the
    image are dropped. What evaluation scores and `fastmae predict` writes, so the two cannot differ."""
    b = xywh(unmap_boxes(boxes.float().cpu(), scale, *hw))
    keep = (b[:, 2] > 0) & (b[:, 3] > 0)
    return [{"category_id": category_ids[c], "bbox": bb, "score": sc}
            for bb, sc, c in zip(b[keep].tolist(), scores.float().cpu()[keep].tolist(), labels.cpu()[keep].tolist())]


# ---------------------------------------------------------------------------------------------------
# Sources.


def scene_instances(items: torch.Tensor, labels: torch.Tensor, num: int, size: int, num_items: tuple[int, int],
                    seed: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Scenes as in segmentation (the same layout for the same seed), with each item's visible extent as its box.

    Returns images (S, 1, size, size) uint8, boxes per scene (n, 4) xyxy (pixel edges: a one-pixel item is
    [x, y, x+1, y+1]) and class indices per scene (n,); an item hidden entirely by later ones has no box.
    """
    h, w = items.shape[-2:]
    count, src, top, left = scene_layout(num, len(items), size, (h, w), num_items, seed)
    hi = num_items[1]
    canvas = torch.zeros(num, size, size, dtype=torch.uint8)  # (S, H, W)
    owner = torch.full((num, size, size), -1, dtype=torch.int64)  # (S, H, W): the top-most item of a pixel
    s_idx = torch.arange(num)[:, None, None]  # (S, 1, 1)
    for j in range(hi):
        item = items[src[:, j], 0]  # (S, h, w)
        fg = (item > SCENE_THRESHOLD) & (j < count)[:, None, None]  # (S, h, w)
        rows = (top[:, j, None] + torch.arange(h))[:, :, None]  # (S, h, 1)
        cols = (left[:, j, None] + torch.arange(w))[:, None, :]  # (S, 1, w)
        canvas[s_idx, rows, cols] = torch.where(fg, item, canvas[s_idx, rows, cols])
        owner[s_idx, rows, cols] = torch.where(fg, j, owner[s_idx, rows, cols])
    boxes, classes = [], []
    ar = torch.arange(size)
    for s in range(num):
        bs, cs = [], []
        for j in range(int(count[s])):
            vis = owner[s] == j  # (H, W)
            if not vis.any():
                continue
            ys, xs = ar[vis.any(1)], ar[vis.any(0)]
            bs.append([float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)])
            cs.append(int(labels[src[s, j]]))
        boxes.append(torch.tensor(bs, dtype=torch.float32).view(-1, 4))
        classes.append(torch.tensor(cs, dtype=torch.int64))
    return canvas.unsqueeze(1), boxes, classes


def coco_dict(split: DetSplit) -> dict:
    """The split's ground truth as a COCO instances dict (images, annotations with area and iscrowd 0, categories)."""
    anns = []
    for img_id, bx, lb in zip(split.image_ids, split.boxes, split.labels):
        for b, c in zip(xywh(bx).tolist(), lb.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": split.category_ids[c], "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0})
    return {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in zip(split.image_ids, split.images.sizes)],
            "annotations": anns,
            "categories": [{"id": c, "name": n} for c, n in zip(split.category_ids, split.classes)]}


def fashion_det_scenes(path: str, split: str, num: int, size: int, num_items: tuple[int, int], seed: int,
                       holdout: bool = False) -> DetSplit:
    """Detection scenes of one split from that split's Fashion-MNIST items (train: train files, eval: t10k).
    holdout: a fixed random sixth of the training items (10,000 of 60,000, t10k's size) is kept out of the 'train'
    scenes, and 'holdout' scenes paste only those, so no item of a held-out scene is seen in training."""
    items, labels = load_fashion_mnist(path, "eval" if split == "eval" else "train")  # (M, 1, 28, 28), (M,)
    if holdout:
        keep = holdout_indices(len(items), len(items) // HOLDOUT_SHARE, "eval" if split == "holdout" else "train")
        items, labels = items[keep], labels[keep]
    images, boxes, classes = scene_instances(items, labels, num, size, num_items,
                                             mix_seed(seed, {"train": 0, "eval": 1, "holdout": 2}[split], 11))
    out = DetSplit(ImageStore(memory=list(images)), boxes, classes, list(range(1, num + 1)),
                   [f"{split} scene {i}" for i in range(num)],
                   list(FASHION_MNIST_CLASSES), list(range(1, len(FASHION_MNIST_CLASSES) + 1)))
    out.coco = coco_dict(out)
    return out


def subset(split: DetSplit, indices: Sequence[int]) -> DetSplit:
    """The images of a split at `indices` (and the ground truth of just those)."""
    ids = [split.image_ids[i] for i in indices]
    return DetSplit(split.images.subset(indices), [split.boxes[i] for i in indices],
                    [split.labels[i] for i in indices], ids, [split.names[i] for i in indices], split.classes,
                    split.category_ids, coco_subset(split.coco, ids))


def read_coco(images_root: str, annotations: str, channels: int, flags: tuple[str, str],
              categories: Sequence[tuple[int, str]] = (), max_image_pixels: int = 0, upright: bool = True) -> DetSplit:
    """The images under `images_root` named by a COCO instances file, with their boxes, checked.

    categories: the training split's (id, name) pairs, so an evaluation file uses the same class indices
    (a category the training file lacks is refused); () reads them from this file. upright: images are turned by
    their EXIF orientation and the boxes are in that frame (False: both in the stored frame).
    """
    root = check_dir(images_root, flags[0])
    path = Path(annotations)
    data = read_coco_json(path)
    try:
        cats = [(int(c["id"]), str(c.get("name", c["id"]))) for c in data["categories"]]
        images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
        sizes = [entry_hw(im) for im in data["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise fail(path, f"an image or category lacks its id or file_name ({e!r})",
                    "every image needs 'id' and 'file_name', every category 'id' and 'name'") from None
    check_images(path, images)
    check_ids(path, data["annotations"], "annotations")
    check_ids(path, data["categories"], "categories")
    cats = list(categories) or sorted(cats)
    index = {cid: k for k, (cid, _) in enumerate(cats)}
    own = {int(c["id"]) for c in data["categories"]}
    if categories and own - set(index):
        raise fail(path, f"categories {sorted(own - set(index))} are not in the training annotations",
                    "use one category list for both splits")
    per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i, _ in images}
    for a in data["annotations"]:
        try:
            img_id, cid, bbox = int(a["image_id"]), int(a["category_id"]), [float(v) for v in a["bbox"]]
        except (KeyError, TypeError, ValueError) as e:
            raise fail(path, f"annotation {a.get('id', '?') if isinstance(a, dict) else a!r} lacks image_id, "
                              f"category_id or a numeric bbox ({e!r})", "each needs bbox [x, y, w, h]") from None
        if img_id not in per_image:
            raise fail(path, f"annotation {a.get('id', '?')} names image_id {img_id}, which is not in 'images'")
        if cid not in index:
            raise fail(path, f"annotation {a.get('id', '?')} has category_id {cid}, which is not in 'categories'",
                        f"known ids: {sorted(index)[:10]}")
        if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0:
            raise fail(path, f"annotation {a.get('id', '?')} has bbox {bbox}: a box is [x, y, w, h] with w, h > 0")
        if not a.get("iscrowd", 0):
            per_image[img_id].append((bbox, index[cid]))
    files, hws, boxes_of, labels_of, ids, names = [], [], [], [], [], []
    turned = 0
    for (img_id, name), stated_hw in zip(images, sizes):
        file = root / name
        (h, w), orientation = coco_image_size(file, img_id, stated_hw, path, f"{flags[0]} {root}", max_image_pixels,
                                              upright)
        turned += upright and orientation != 1
        boxes = torch.tensor([b for b, _ in per_image[img_id]], dtype=torch.float32).view(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        if any(box_outside(b, h, w) for b, _ in per_image[img_id]):
            raise fail(path, f"a box of image {name} (id {img_id}) lies outside the {w}x{h} (WxH) image",
                        "boxes are [x, y, w, h] in the image's pixels")
        files.append(file)
        hws.append((h, w))
        boxes_of.append(boxes.clamp(min=0))
        labels_of.append(torch.tensor([c for _, c in per_image[img_id]], dtype=torch.int64))
        ids.append(img_id)
        names.append(str(file))
    warn_exif_turned(turned, len(images), root, "boxes")
    warn_colour_dropped(files, channels, root)
    store = ImageStore(files, hws, channels=channels, max_image_pixels=max_image_pixels, upright=upright)
    return DetSplit(store, boxes_of, labels_of, ids, names, [n for _, n in cats], [c for c, _ in cats], data)


def warn_empty_classes(split: DetSplit) -> list[str]:
    """Classes with no training box (logged once each; they can only be false positives)."""
    seen = set(torch.cat(split.labels).tolist()) if split.labels else set()
    empty = [n for k, n in enumerate(split.classes) if k not in seen]
    for n in empty:
        log.warning("category %r has no training boxes: the detector cannot learn it", n)
    return empty


# ---------------------------------------------------------------------------------------------------
# The loader.


def placed_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """The size (h', w') an h x w image takes on the canvas at `scale` (at least one pixel)."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def letterbox(img: torch.Tensor, size: tuple[int, int], scale: float, dx: int, dy: int, flip: bool,
              fill: torch.Tensor, full_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (C0, h, w) -> uint8 (C, H, W): resized by `scale` (bilinear, antialiased), placed at (dx, dy) on a
    canvas of `fill` (C, 1, 1) uint8 (the mean colour, 0 once normalised), then flipped. full_hw: the image's size
    when `img` was decoded at a reduced size (the scale is of the full one)."""
    nh, nw = placed_size(*(full_hw or img.shape[-2:]), scale)
    x = img[None]  # (1, C0, h, w)
    if (nh, nw) != tuple(img.shape[-2:]):
        x = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    C = fill.shape[0]
    out = fill.expand(C, *size).clone()  # (C, H, W)
    out[:, dy : dy + nh, dx : dx + nw] = x[0, :, : size[0] - dy, : size[1] - dx].expand(C, -1, -1)
    return out.flip(-1) if flip else out


def mean_colour(mean: Sequence[float], channels: int) -> torch.Tensor:
    """The normalisation mean as a uint8 colour (C, 1, 1): padding that normalises to (about) 0."""
    values = list(mean) * channels if len(mean) == 1 else list(mean)
    return torch.tensor([round(255 * m) for m in values], dtype=torch.uint8).clamp(0, 255).view(-1, 1, 1)


class DetSamples(DenseSamples):
    """Images of a DetSplit letterboxed onto the canvas (uint8), with their boxes mapped there."""

    def __init__(self, split: DetSplit, img_size: tuple[int, int], scale_range: tuple[float, float], hflip: bool,
                 fill: torch.Tensor):
        self.split, self.img_size, self.scale_range, self.hflip, self.fill = split, img_size, scale_range, hflip, fill
        self.images = split.images

    def __len__(self) -> int:
        return len(self.split.images)

    def placement(self, i: int, g: torch.Generator | None) -> tuple[float, int, int, bool]:
        """(scale, dx, dy, flip) of image i: fitted at the top left for evaluation; in training a random scale of
        the fit, a random place and a coin flip, from `g`."""
        h, w = self.split.images.hw(i)
        H, W = self.img_size
        s = letterbox_scale(h, w, H, W)
        if g is None:
            return s, 0, 0, False
        lo, hi = self.scale_range
        s *= lo + (hi - lo) * float(torch.rand((), generator=g))
        nh, nw = placed_size(h, w, s)
        dx = int(torch.randint(0, W - nw + 1, (), generator=g))
        dy = int(torch.randint(0, H - nh + 1, (), generator=g))
        return s, dx, dy, bool(self.hflip and float(torch.rand((), generator=g)) < 0.5)

    def sample(self, i: int, g: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        """Image i on the canvas (C, H, W) uint8, with its canvas boxes."""
        s, dx, dy, flip = self.placement(i, g)
        images = self.split.images
        img = images.load(i, images.reduction(i, 1 / s))  # a large JPEG decoded near the placed size
        x = letterbox(img, self.img_size, s, dx, dy, flip, self.fill, images.hw(i))  # (C, H, W)
        boxes = map_boxes(self.split.boxes[i], s, dx, dy)
        if flip:
            boxes = flip_boxes(boxes, self.img_size[1])
        return x, {"boxes": boxes, "labels": self.split.labels[i], "scale": s, "image_id": self.split.image_ids[i],
                   "index": i}


class DetLoader(DenseLoader):
    """Batches of (images (B, C, H, W) normalised, targets): a dict of per-image lists, 'boxes' (n, 4) canvas xyxy,
    'labels' (n,), and 'scale' / 'image_id' / 'index' to map predictions back. Padding is the mean colour. Images
    are decoded and placed in `num_workers` worker processes."""

    def __init__(self, split: DetSplit, img_size: tuple[int, int], *, scale_range: tuple[float, float] = (0.6, 1.0),
                 num_workers: int = 0, **kw):
        fill = mean_colour(kw["mean"], kw["channels"])
        samples = DetSamples(split, tuple(img_size), tuple(scale_range), kw.get("hflip", True), fill)
        super().__init__(samples, img_size=img_size, num_workers=num_workers, **kw)
        self.split = split
