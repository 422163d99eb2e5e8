"""A generated COCO-format detection set with objects of several sizes: squares, discs and triangles of 6-64 px on
noisy 96x96 backgrounds, so that every level of the detection pyramid has objects (strides 2 / 4 / 8 of a patch-4
ViT take sides up to 16, 16-32 and above 32 px). Shapes are told apart by outline, not colour: each has a random
grey level at least 60 away from its background's, and the images are grey, as the Fashion-MNIST encoders read.

    python benchmarks/make_shapes_coco.py --out runs/shapes [--train 2000 --val 500 --seed 0]
    fastmae detect --init runs/pretrain --data.source coco --data.path runs/shapes/train \
        --det.annotations runs/shapes/train.json --data.eval_path runs/shapes/val --det.eval_annotations runs/shapes/val.json

Writes OUT/train/*.png, OUT/val/*.png and OUT/train.json, OUT/val.json (COCO instances: images, annotations with
tight boxes of what is visible, categories). The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("square", "disc", "triangle")
SIZE = 96
SIDES = (6.0, 64.0)  # object sizes, log-uniform between these (pixels)
MAX_OVERLAP = 0.25  # a new object may cover at most this share of an earlier one's box


def draw_shape(kind: str, box: tuple[float, float, float, float], angle: float) -> Image.Image:
    """A SIZE x SIZE mask ('L', 255 inside) of one shape filling `box` (a triangle turned by `angle`)."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = box
    if kind == "square":
        d.rectangle([x1, y1, x2 - 1, y2 - 1], fill=255)
    elif kind == "disc":
        d.ellipse([x1, y1, x2 - 1, y2 - 1], fill=255)
    else:
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        pts = [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
               for k in range(3)]
        d.polygon(pts, fill=255)
    return mask


def make_image(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    """One image (SIZE, SIZE) uint8 and its objects as ([x, y, w, h] of the visible part, class index)."""
    bg = int(rng.integers(0, 256))
    img = np.clip(bg + rng.normal(0, 12, (SIZE, SIZE)), 0, 255)
    owner = np.full((SIZE, SIZE), -1)
    placed: list[tuple[tuple[float, float, float, float], int]] = []
    for _ in range(int(rng.integers(1, 6))):
        for _try in range(20):
            side = float(np.exp(rng.uniform(*np.log(SIDES))))
            x1, y1 = rng.uniform(0, SIZE - side, 2)
            box = (float(x1), float(y1), float(x1 + side), float(y1 + side))
            inter = [max(0.0, min(box[2], b[2]) - max(box[0], b[0])) * max(0.0, min(box[3], b[3]) - max(box[1], b[1]))
                     / ((b[2] - b[0]) * (b[3] - b[1])) for b, _ in placed]
            if all(v <= MAX_OVERLAP for v in inter):
                break
        else:
            continue
        k = int(rng.integers(0, len(CLASSES)))
        mask = np.asarray(draw_shape(CLASSES[k], box, float(rng.uniform(0, 2 * math.pi)))) > 127
        grey = (bg + int(rng.choice([-1, 1])) * int(rng.integers(60, 160))) % 256
        if abs(grey - bg) < 60:
            grey = (bg + 128) % 256
        img[mask] = np.clip(grey + rng.normal(0, 6, int(mask.sum())), 0, 255)
        owner[mask] = len(placed)
        placed.append((box, k))
    objects = []
    for j, (_, k) in enumerate(placed):
        ys, xs = np.nonzero(owner == j)
        if len(xs):  # what is left visible of it
            objects.append(([float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                             float(ys.max() + 1 - ys.min())], k))
    return img.astype(np.uint8), objects


def write_split(out: Path, name: str, n: int, rng: np.random.Generator) -> Path:
    """n images under OUT/name and their COCO instances file OUT/name.json."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img, objects = make_image(rng)
        file = f"{i:06d}.png"
        Image.fromarray(img, "L").save(folder / file)
        images.append({"id": i + 1, "file_name": file, "width": SIZE, "height": SIZE})
        for bbox, k in objects:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": k + 1, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
    path = out / f"{name}.json"
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shapes")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    rng = np.random.default_rng(a.seed)
    for name, n in (("train", a.train), ("val", a.val)):
        path = write_split(out, name, n, rng)
        data = json.loads(path.read_text())
        sides = [max(x["bbox"][2:]) for x in data["annotations"]]
        print(f"{path}: {n} images, {len(sides)} objects, longer side {min(sides):.0f}-{max(sides):.0f} px "
              f"(<=16: {sum(s <= 16 for s in sides)}, 16-32: {sum(16 < s <= 32 for s in sides)}, "
              f">32: {sum(s > 32 for s in sides)})")


if __name__ == "__main__":
    main()
