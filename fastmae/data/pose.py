"""Pose data: top-down keypoint instances from Fashion-MNIST garment scenes (built-in, offline) or COCO keypoints
files, and the loader that crops each instance from its box.

Shapes: N instances, K keypoints, C channels, H, W crop (--model.img_size), h, w an image's own size.
Coordinates are continuous pixels (pixel j covers [j, j+1)) in every frame. An instance is its image's index, a box
(x, y, w, h) and keypoints (K, 3) as COCO writes them: x, y, v with v = 0 unlabelled, 1 labelled but hidden,
2 visible. Training weights are v > 0.

Top-down crops (mmpose's `TopdownAffine` with `bbox_xywh2cs`): the box's centre, its size widened to the crop's
aspect ratio (W/H) and x1.25; an affine map (rotation, scale, translation; `crop_matrix`) takes the image to the
crop, `warp` samples it (bilinear, black outside), and keypoints go through the same matrix (back through its
inverse for predictions). Training adds a random scale and rotation of the box and a flip of the crop (x -> W - x,
left/right partners swapped).

Built-in task (`fashion_pose_scenes`): 1-2 Fashion-MNIST garments per 64x64 canvas, each under a random affine warp
(scale, rotation, translation, parts may leave the canvas), later ones on top. Seven landmarks of each garment come
from its own silhouette before the warp (its top and bottom, four corners as the extreme points of x + y and its
mirror images, its centre of mass), so they move with the garment; `left_*` / `right_*` are mirror-symmetric
definitions, which keeps them consistent under a flip. v = 0 out of the canvas, 1 under a later garment, else 2.
The box and area are the garment's visible silhouette.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .coco_json import (
    box_outside,
    check_ids,
    check_images,
    coco_image_size,
    entry_hw,
    fail,
    field_float,
    field_int,
    read_coco_json,
)
from .decode import warn_exif_turned
from .dense import DenseLoader, DenseSamples, ImageStore, to_uint8, warn_colour_dropped
from .sampler import mix_seed
from .sources import check_dir, load_fashion_mnist

log = logging.getLogger(__name__)

BOX_PADDING = 1.25  # mmpose's bbox padding of top-down crops
ROTATE_PROB = 0.6  # mmpose's RandomBBoxTransform: the share of crops rotated in training
FASHION_KEYPOINTS = ("top", "bottom", "left_top", "right_top", "left_bottom", "right_bottom", "centre")
FASHION_SKELETON = ((0, 2), (0, 3), (2, 4), (3, 5), (4, 1), (5, 1), (6, 0), (6, 1))
SILHOUETTE = 32  # uint8 intensity above which a garment pixel is part of its silhouette
LANDMARK_CHUNK = 4096  # items whose landmarks are computed at once
COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle")
COCO_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
               0.087, 0.089, 0.089)  # COCO's per-keypoint OKS sigmas (pycocotools' defaults)
KEYPOINT_SCORE = 0.2  # mmpose: an instance's score is the mean of its keypoint scores above this
DEFAULT_SIGMA = 0.067  # the OKS sigma of every keypoint of another layout: the mean of COCO's 17


@dataclass
class PoseSplit:
    """One split: its images (files or generated scenes, loaded one at a time) and their instances (boxes,
    keypoints), with the ground truth as a COCO keypoints dict (what COCOeval reads) and the instances left out,
    counted by reason."""

    images: ImageStore
    image_ids: list[int]
    names: list[str]
    owner: torch.Tensor  # (N,) int64: the image of each instance
    boxes: torch.Tensor  # (N, 4) float32 x y w h
    keypoints: torch.Tensor  # (N, K, 3) float32 x y v
    keypoint_names: list[str]
    skeleton: list[tuple[int, int]]  # 0-based keypoint pairs
    category_id: int = 1
    category: str = "object"
    areas: torch.Tensor | None = None  # (N,) the OKS scale of each instance (COCO 'area'), box area if None
    coco: dict = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def sigmas_for(names: Sequence[str], given: Sequence[float] = ()) -> tuple[list[float], str]:
    """OKS sigmas and where they come from: the given ones (one per keypoint), COCO's when the names are COCO's
    17, else DEFAULT_SIGMA for each."""
    if given:
        if len(given) != len(names):
            raise ValueError(f"--pose.sigmas has {len(given)} values for {len(names)} keypoints; give one per keypoint")
        if not all(math.isfinite(s) and s > 0 for s in given):
            raise ValueError(f"--pose.sigmas must be positive, got {list(given)}")
        return [float(s) for s in given], "--pose.sigmas"
    if tuple(names) == COCO_KEYPOINTS:
        return list(COCO_SIGMAS), "COCO's 17"
    return [DEFAULT_SIGMA] * len(names), f"{DEFAULT_SIGMA} each (the mean of COCO's 17; set --pose.sigmas)"


def pose_coco_dict(split: PoseSplit) -> dict:
    """The split's instances as a COCO keypoints dict (1-based skeleton, num_keypoints, area, iscrowd 0)."""
    anns = []
    areas = split.areas if split.areas is not None else split.boxes[:, 2] * split.boxes[:, 3]
    for n, (i, box, kp, area) in enumerate(zip(split.owner.tolist(), split.boxes.tolist(), split.keypoints,
                                               areas.tolist())):
        anns.append({"id": n + 1, "image_id": split.image_ids[i], "category_id": split.category_id, "bbox": box,
                     "area": area, "iscrowd": 0, "num_keypoints": int((kp[:, 2] > 0).sum()),
                     "keypoints": kp.flatten().tolist()})
    return {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in zip(split.image_ids, split.images.sizes)],
            "annotations": anns,
            "categories": [{"id": split.category_id, "name": split.category, "keypoints": list(split.keypoint_names),
                            "skeleton": [[a + 1, b + 1] for a, b in split.skeleton]}]}


# ---------------------------------------------------------------------------------------------------
# Crops: the affine map of a box to the crop, and its use on images and keypoints.


def box_centre_scale(box: Sequence[float], aspect: float,
                     padding: float = BOX_PADDING) -> tuple[float, float, float, float]:
    """(cx, cy, sw, sh): a box x y w h as its centre and a size of aspect ratio `aspect` (= W/H of the crop) that
    holds it, times `padding` (mmpose's bbox_xywh2cs)."""
    x, y, w, h = (float(v) for v in box)
    cx, cy = x + w / 2, y + h / 2
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    return cx, cy, w * padding, h * padding


def crop_matrix(cx: float, cy: float, sw: float, size: tuple[int, int], rotation: float = 0.0) -> torch.Tensor:
    """The 2x3 affine matrix A taking image pixels to crop pixels, u = A [x, y, 1]: the region of width sw
    around (cx, cy), rotated by `rotation` degrees, onto an H x W crop centred on it."""
    H, W = size
    k = W / sw
    t = math.radians(rotation)
    c, s = math.cos(t) * k, math.sin(t) * k
    return torch.tensor([[c, -s, W / 2 - c * cx + s * cy], [s, c, H / 2 - s * cx - c * cy]], dtype=torch.float64)


def udp_crop_matrix(cx: float, cy: float, sw: float, sh: float, size: tuple[int, int]) -> torch.Tensor:
    """ViTPose's crop (UDP, Huang et al., 2020, as mmpose's and transformers' VitPose image processors make it) as a
    fastmae matrix: in pixel-index coordinates the region [cx - sw/2, cx + sw/2] x [cy - sh/2, cy + sh/2] goes onto
    crop pixels 0..W-1 x 0..H-1; returned for continuous coordinates (pixel centres at +0.5), u = A [x, y, 1]."""
    H, W = size
    ax, ay = (W - 1) / sw, (H - 1) / sh
    return torch.tensor([[ax, 0.0, ax * (sw / 2 - cx - 0.5) + 0.5], [0.0, ay, ay * (sh / 2 - cy - 0.5) + 0.5]],
                        dtype=torch.float64)


def udp_keypoints(xy: torch.Tensor, matrices: torch.Tensor, crop: tuple[int, int],
                  heat: tuple[int, int]) -> torch.Tensor:
    """Keypoints decoded on heatmaps (B, K, 2), continuous heatmap pixels, of UDP crops (`udp_crop_matrix`) -> image
    pixel-index coordinates as transformers' VitPose post-processing gives them: heatmap index i is crop index
    i (W-1)/(W'-1)."""
    (H, W), (Hh, Wh) = crop, heat
    grid = torch.tensor([(W - 1) / max(Wh - 1, 1), (H - 1) / max(Hh - 1, 1)], dtype=torch.float64)
    crop_xy = (xy.double() - 0.5) * grid + 0.5  # continuous crop pixels
    return (unmap_keypoints(crop_xy, matrices) - 0.5).to(xy.dtype)


def invert_matrix(A: torch.Tensor) -> torch.Tensor:
    """The inverse of a 2x3 affine matrix (crop pixels back to image pixels)."""
    full = torch.cat([A.double(), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    return torch.linalg.inv(full)[:2]


def apply_matrix(A: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Points (..., 2) through a 2x3 affine matrix."""
    A = A.to(torch.float64)
    return (xy.double() @ A[:, :2].T + A[:, 2]).to(xy.dtype)


def warp(img: torch.Tensor, A: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float images (B, C, h, w) -> (B, C, H, W): crop pixel u samples the image at A^-1 u (bilinear, 0 outside).
    A is one (2, 3) matrix or one per image (B, 2, 3)."""
    B, _, h, w = img.shape
    H, W = size
    inv = torch.stack([invert_matrix(a) for a in (A if A.ndim == 3 else A[None].expand(B, -1, -1))])  # (B, 2, 3)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                            indexing="ij")
    u = torch.stack([xs, ys], -1).view(1, H * W, 2)  # (1, HW, 2) crop pixel centres
    p = u @ inv[:, :, :2].transpose(1, 2) + inv[:, None, :, 2]  # (B, HW, 2) image pixels
    grid = (p / torch.tensor([w, h], dtype=torch.float64) * 2 - 1).view(B, H, W, 2)  # align_corners=False
    return F.grid_sample(img, grid.to(img.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_region(A: torch.Tensor, size: tuple[int, int], hw: tuple[int, int],
                margin: int = 2) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the part of an h x w image that the crop of matrix A samples (the inverse map of the crop's
    corners, `margin` pixels wider for the bilinear neighbours), clipped to the image; empty when the crop lies
    outside it. Warping only this part gives the same crop at a fraction of the cost on large images."""
    H, W = size
    corners = torch.tensor([[0.0, 0.0], [W, 0.0], [0.0, H], [W, H]], dtype=torch.float64)
    p = apply_matrix(invert_matrix(A), corners)  # (4, 2) image pixels
    h, w = hw
    x0 = min(max(math.floor(float(p[:, 0].min())) - margin, 0), w)
    y0 = min(max(math.floor(float(p[:, 1].min())) - margin, 0), h)
    x1 = max(min(math.ceil(float(p[:, 0].max())) + margin, w), x0)
    y1 = max(min(math.ceil(float(p[:, 1].max())) + margin, h), y0)
    return x0, y0, x1, y1


def warp_region(img: torch.Tensor, A: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C0, h, w) -> float (C0, H, W) in [0, 1]: `warp` of the image through A, reading only the region the
    crop samples (converted to float there alone)."""
    x0, y0, x1, y1 = crop_region(A, size, tuple(img.shape[-2:]))
    if x1 - x0 < 1 or y1 - y0 < 1:  # the crop lies wholly outside the image: black
        return torch.zeros(img.shape[0], *size)
    part = img[:, y0:y1, x0:x1].float().div_(255.0)[None]  # (1, C0, h', w')
    shifted = A.clone()
    shifted[:, 2] += A[:, :2] @ torch.tensor([float(x0), float(y0)], dtype=A.dtype)  # region pixels -> crop
    return warp(part, shifted, size)[0]


# ---------------------------------------------------------------------------------------------------
# The built-in task: Fashion-MNIST garments with landmarks of their own silhouettes.


def silhouette_landmarks(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Items (M, 1, h, w) uint8 -> landmarks (M, 7, 2) in item pixels (FASHION_KEYPOINTS) and whether the item has
    a silhouette (M,). A landmark is the mean of the silhouette's pixel centres that come within a pixel of the
    extreme of its score (top: y, bottom: -y, left_top: x + y, right_top: -x + y, ...; centre: all pixels)."""
    M, _, h, w = items.shape
    if M > LANDMARK_CHUNK:  # a chunk at a time: the (M, 7, h, w) intermediates of 60,000 items take gigabytes
        parts = [silhouette_landmarks(items[i : i + LANDMARK_CHUNK]) for i in range(0, M, LANDMARK_CHUNK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    fg = items[:, 0] > SILHOUETTE  # (M, h, w)
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")  # (h, w)
    scores = torch.stack([ys, -ys, xs + ys, -xs + ys, xs - ys, -xs - ys])  # (6, h, w)
    tol = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).view(1, 6, 1, 1)
    s = torch.where(fg[:, None], scores[None], torch.tensor(float("inf")))  # (M, 6, h, w)
    best = s.flatten(2).amin(-1)[..., None, None]  # (M, 6, 1, 1)
    sel = (s <= best + tol) & fg[:, None]  # (M, 6, h, w)
    sel = torch.cat([sel, fg[:, None]], 1).float()  # (M, 7, h, w): + the centre of mass
    n = sel.sum((-2, -1)).clamp(min=1)  # (M, 7)
    out = torch.stack([(sel * xs).sum((-2, -1)) / n, (sel * ys).sum((-2, -1)) / n], -1)  # (M, 7, 2)
    return out, fg.flatten(1).any(1)


def garment_poses(num: int, slots: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random warps of `slots` garments on `num` canvases, a pure function of the seed: item counts (S,), scales,
    rotations (degrees) and centres (S, T) / (S, T, 2)."""
    g = torch.Generator().manual_seed(seed)
    return {"count": torch.randint(1, slots + 1, (num,), generator=g),
            "scale": 1.0 + 0.8 * torch.rand(num, slots, generator=g),  # 28 px -> 28 to 50 px
            "rotation": 60 * torch.rand(num, slots, generator=g) - 30,
            "centre": 6 + (size - 12) * torch.rand(num, slots, 2, generator=g)}


def pose_scenes(items: torch.Tensor, num: int, size: int, slots: int, seed: int) -> dict:
    """Canvases of warped garments with their landmarks: images (S, 1, size, size) uint8, per garment its slot's
    keypoints (S, T, 7, 3) (x, y, v canvas pixels), box (S, T, 4) x y w h and area (S, T) of its visible silhouette
    (0: wholly hidden or off the canvas), and which garments exist (S, T)."""
    h, w = items.shape[-2:]
    pose = garment_poses(num, slots, size, seed)
    g = torch.Generator().manual_seed(mix_seed(seed, 1))
    src = torch.randint(0, len(items), (num, slots), generator=g)  # (S, T)
    marks, ok = silhouette_landmarks(items)  # (M, 7, 2), (M,)
    exists = (torch.arange(slots) < pose["count"][:, None]) & ok[src]  # (S, T)
    canvas = torch.zeros(num, size, size)  # (S, H, W)
    owner = torch.full((num, size, size), -1, dtype=torch.int64)  # (S, H, W): the top-most garment of a pixel
    kps = torch.zeros(num, slots, 7, 3)
    for j in range(slots):
        # item pixels -> canvas: centre the item, scale, rotate, move to its centre
        A = torch.stack([crop_matrix(w / 2, h / 2, size / float(s), (size, size), float(r))
                         for s, r in zip(pose["scale"][:, j], pose["rotation"][:, j])])  # (S, 2, 3)
        A[:, :, 2] += (pose["centre"][:, j] - size / 2).double()
        img = warp(items[src[:, j]].float(), A, (size, size))[:, 0]  # (S, H, W)
        fg = (img > SILHOUETTE) & exists[:, j, None, None]
        canvas = torch.where(fg, img, canvas)
        owner = torch.where(fg, j, owner)
        kps[:, j, :, :2] = torch.stack([apply_matrix(a, m) for a, m in zip(A, marks[src[:, j]])])
    boxes, areas = torch.zeros(num, slots, 4), torch.zeros(num, slots)
    ar = torch.arange(size, dtype=torch.float32)
    for j in range(slots):
        vis = owner == j  # (S, H, W)
        areas[:, j] = vis.flatten(1).sum(1).float()
        rows, cols = vis.any(2), vis.any(1)  # (S, H), (S, W)
        inf = torch.tensor(float("inf"))
        y0, y1 = torch.where(rows, ar, inf).amin(1), torch.where(rows, ar, -inf).amax(1) + 1
        x0, x1 = torch.where(cols, ar, inf).amin(1), torch.where(cols, ar, -inf).amax(1) + 1
        boxes[:, j] = torch.stack([x0, y0, x1 - x0, y1 - y0], 1)
        xy = kps[:, j, :, :2]  # (S, 7, 2)
        inside = ((xy >= 0) & (xy < size)).all(-1)  # (S, 7)
        px = xy.clamp(0, size - 1).long()
        top = owner[torch.arange(num)[:, None], px[..., 1], px[..., 0]]  # (S, 7)
        kps[:, j, :, 2] = torch.where(inside, torch.where(top > j, 1.0, 2.0), 0.0)
    exists &= areas > 0
    return {"images": canvas.round().clamp(0, 255).to(torch.uint8)[:, None], "keypoints": kps, "boxes": boxes,
            "areas": areas, "exists": exists}


def fashion_pose_scenes(path: str, split: str, num: int, size: int = 64, slots: int = 2, seed: int = 0) -> PoseSplit:
    """The built-in keypoint task of one split (train: Fashion-MNIST train items, eval: t10k), deterministic."""
    items, _ = load_fashion_mnist(path, "train" if split == "train" else "eval")  # (M, 1, 28, 28)
    sc = pose_scenes(items, num, size, slots, mix_seed(seed, {"train": 0, "eval": 1}[split], 13))
    labelled = (sc["keypoints"][..., 2] > 0).any(-1)  # (S, T)
    keep = sc["exists"] & labelled
    s_idx, t_idx = keep.nonzero(as_tuple=True)
    out = PoseSplit(ImageStore(memory=list(sc["images"])), list(range(1, num + 1)),
                    [f"{split} scene {i}" for i in range(num)], s_idx,
                    sc["boxes"][s_idx, t_idx], sc["keypoints"][s_idx, t_idx], list(FASHION_KEYPOINTS),
                    list(FASHION_SKELETON), 1, "garment", sc["areas"][s_idx, t_idx])
    hidden = int((sc["exists"] & ~labelled).sum())
    out.skipped = {"no labelled keypoint": hidden} if hidden else {}
    out.coco = pose_coco_dict(out)
    return out


# ---------------------------------------------------------------------------------------------------
# COCO keypoints files.


def read_coco_keypoints(images_root: str, annotations: str, channels: int, flags: tuple[str, str],
                        like: PoseSplit | None = None, max_image_pixels: int = 0, upright: bool = True) -> PoseSplit:
    """The instances of a COCO keypoints file (its one category with 'keypoints'), their images under
    `images_root`, checked. Crowd annotations, boxes of zero size and instances without a labelled keypoint are
    left out and counted (`skipped`). like: the training split, whose keypoint names this one must have.
    upright: images are turned by their EXIF orientation, boxes and keypoints in that frame (False: as stored)."""
    root = check_dir(images_root, flags[0])
    path = Path(annotations)
    data = read_coco_json(path, "keypoints", "person_keypoints_train2017.json")
    cats = [c for c in data["categories"] if isinstance(c, dict) and isinstance(c.get("keypoints"), list)]
    if len(cats) != 1:
        raise fail(path, f"{len(cats)} categories list 'keypoints' (a COCO keypoints file has one, e.g. person)",
                    "pass person_keypoints_*.json, or a file whose one category has 'keypoints' and 'skeleton'")
    cat = cats[0]
    names = [str(n) for n in cat["keypoints"]]
    K = len(names)
    if like is not None and names != like.keypoint_names:
        raise fail(path, f"keypoints {names} differ from the training annotations' {like.keypoint_names}",
                    "use one keypoint layout for both splits")
    try:
        skeleton = [(int(a) - 1, int(b) - 1) for a, b in cat.get("skeleton") or []]
        cid = int(cat["id"])
        images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
        sizes = [entry_hw(im) for im in data["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise fail(path, f"an image or the category lacks its id or file_name, or a skeleton edge is not two "
                          f"keypoint numbers ({e!r})", "see the COCO keypoints format") from None
    if any(not (0 <= a < K and 0 <= b < K) for a, b in skeleton):
        raise fail(path, f"the skeleton {cat['skeleton']} names keypoints outside 1..{K}")
    check_images(path, images)
    check_ids(path, data["annotations"], "annotations")
    check_ids(path, data["categories"], "categories")
    known = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    index = {i: n for n, (i, _) in enumerate(images)}
    owner, boxes, kps, areas = [], [], [], []
    skipped = {"crowd": 0, "box of zero size": 0, "no labelled keypoint": 0}
    for a in data["annotations"]:
        if not isinstance(a, dict):
            raise fail(path, f"an annotation is {a!r}, not an object", "see the COCO keypoints format")
        category = field_int(path, a, "category_id")
        if category not in known:
            raise fail(path, f"annotation {a.get('id', '?')} has category_id {category}, which is not in 'categories'",
                       f"known ids: {sorted(k for k in known if k is not None)[:10]}")
        if category != cid:
            continue
        aid = a.get("id", "?")
        try:
            img_id, bbox = int(a["image_id"]), [float(v) for v in a["bbox"]]
            kp = [float(v) for v in a["keypoints"]]
        except (KeyError, TypeError, ValueError) as e:
            raise fail(path, f"annotation {aid} lacks image_id, a numeric bbox or keypoints ({e!r})",
                        "each needs bbox [x, y, w, h] and keypoints [x, y, v] * K") from None
        if len(kp) != 3 * K:
            raise fail(path, f"annotation {aid} has {len(kp)} keypoint values, but category {cat.get('name', cid)!r} "
                              f"has {K} keypoints ({3 * K} values: x, y, v each)",
                        "write keypoints [x, y, v] for every keypoint of the category")
        if img_id not in index:
            raise fail(path, f"annotation {aid} names image_id {img_id}, which is not in 'images'")
        if len(bbox) != 4 or not all(map(math.isfinite, bbox + kp)):
            raise fail(path, f"annotation {aid} has a bbox {bbox} or keypoints that are not finite numbers")
        if a.get("iscrowd", 0):
            skipped["crowd"] += 1
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            skipped["box of zero size"] += 1
            continue
        k = torch.tensor(kp, dtype=torch.float32).view(K, 3)
        if not (k[:, 2] > 0).any():
            skipped["no labelled keypoint"] += 1
            continue
        owner.append(index[img_id])
        boxes.append(bbox)
        kps.append(k)
        areas.append(field_float(path, a, "area", 0.0) or bbox[2] * bbox[3])
    split = PoseSplit(ImageStore(), [], [], torch.tensor(owner, dtype=torch.int64), torch.tensor(boxes).view(-1, 4),
                      torch.stack(kps) if kps else torch.zeros(0, K, 3), names, skeleton, cid,
                      str(cat.get("name", cid)), torch.tensor(areas))
    used = sorted(set(owner))
    remap = {n: m for m, n in enumerate(used)}
    split.owner = torch.tensor([remap[n] for n in owner], dtype=torch.int64)
    turned, files, hws = 0, [], []
    for n in used:  # only the images with an instance
        img_id, name = images[n]
        file = root / name
        hw, orientation = coco_image_size(file, img_id, sizes[n], path, f"{flags[0]} {root}", max_image_pixels,
                                          upright)
        turned += upright and orientation != 1
        files.append(file)
        hws.append(hw)
        split.image_ids.append(img_id)
        split.names.append(str(file))
    for box, owner_n in zip(split.boxes.tolist(), split.owner.tolist()):  # each box against its image, once
        if box_outside(box, *hws[owner_n]):
            img_id, name = split.image_ids[owner_n], images[used[owner_n]][1]
            raise fail(path, f"a box {box} of image {name} (id {img_id}) lies outside the {hws[owner_n][1]}x"
                             f"{hws[owner_n][0]} (WxH) image", "boxes are [x, y, w, h] in the image's pixels")
    split.images = ImageStore(files, hws, channels=channels, max_image_pixels=max_image_pixels, upright=upright)
    warn_colour_dropped(files, channels, root)
    warn_exif_turned(turned, len(used), root, "keypoints")
    split.skipped = {k: v for k, v in skipped.items() if v}
    split.coco = pose_coco_dict(split)
    return split


def report_skipped(split: PoseSplit, what: str) -> str:
    """One line on the instances a split left out, by reason ('' when none)."""
    if not split.skipped:
        return ""
    parts = ", ".join(f"{v} {k}" for k, v in split.skipped.items())
    return f"{what}: left out {sum(split.skipped.values())} instances ({parts})"


# ---------------------------------------------------------------------------------------------------
# The loader.


class PoseSamples(DenseSamples):
    """Instances of a PoseSplit cropped from their boxes (uint8), with their keypoints in the crop."""

    def __init__(self, split: PoseSplit, img_size: tuple[int, int], flip: Sequence[int],
                 scale_range: tuple[float, float], rotation: float, hflip: bool, channels: int,
                 codec: str = "continuous"):
        self.split, self.img_size, self.flip, self.codec = split, img_size, list(flip), codec
        self.images = split.images
        self.scale_range, self.rotation, self.hflip, self.channels = scale_range, rotation, hflip, channels

    def __len__(self) -> int:
        return len(self.split.boxes)

    def transform(self, i: int, g: torch.Generator | None) -> tuple[torch.Tensor, bool]:
        """(A, flip) of instance i: its box to the crop; in training a random scale and rotation and a coin flip."""
        H, W = self.img_size
        cx, cy, sw, sh = box_centre_scale(self.split.boxes[i].tolist(), W / H)
        if self.codec == "udp":  # a ViTPose model's evaluation crop (it is not trained here)
            return udp_crop_matrix(cx, cy, sw, sh, self.img_size), False
        rot, flip = 0.0, False
        if g is not None:
            lo, hi = self.scale_range
            sw *= lo + (hi - lo) * float(torch.rand((), generator=g))
            if float(torch.rand((), generator=g)) < ROTATE_PROB:
                rot = self.rotation * (2 * float(torch.rand((), generator=g)) - 1)
            flip = bool(self.hflip and float(torch.rand((), generator=g)) < 0.5)
        return crop_matrix(cx, cy, sw, self.img_size, rot), flip

    def sample(self, i: int, g: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        """Instance i's crop (C, H, W) uint8, with its keypoints in the crop."""
        A, flip = self.transform(i, g)
        n, images = int(self.split.owner[i]), self.split.images
        k = float(torch.linalg.det(A[:, :2].float()).abs().sqrt())  # crop pixels per image pixel
        img = images.load(n, images.reduction(n, 1 / k))  # (C0, h', w') uint8: a large JPEG near the crop's scale
        r = images.hw(n)[0] / img.shape[-2]  # the reduction libjpeg applied (1 for other files)
        A_img = A.clone()
        A_img[:, :2] *= r  # reduced pixels -> crop (pixel j of the reduced image covers [j r, (j + 1) r))
        x = to_uint8(warp_region(img, A_img, self.img_size)).expand(self.channels, -1, -1)  # (C, H, W)
        kp = self.split.keypoints[i]
        xy, w = apply_matrix(A, kp[:, :2]), (kp[:, 2] > 0).float()  # (K, 2), (K,)
        if flip:
            x = x.flip(-1)
            xy = torch.stack([self.img_size[1] - xy[:, 0], xy[:, 1]], 1)[self.flip]
            w = w[self.flip]
        return x.contiguous(), {"keypoints": xy, "weights": w, "matrix": A, "index": i}

    @staticmethod
    def collate(targets: list[dict]) -> dict[str, torch.Tensor]:
        return {"keypoints": torch.stack([t["keypoints"] for t in targets]),  # (B, K, 2)
                "weights": torch.stack([t["weights"] for t in targets]),  # (B, K)
                "matrix": torch.stack([t["matrix"] for t in targets]),  # (B, 2, 3)
                "index": torch.tensor([t["index"] for t in targets])}  # (B,)


class PoseLoader(DenseLoader):
    """Batches of (crops (B, C, H, W) normalised, targets): 'keypoints' (B, K, 2) crop pixels, 'weights' (B, K)
    (labelled keypoints in the crop: 1), 'matrix' (B, 2, 3) image -> crop, 'index' (B,) instance. Images are
    decoded and cropped in `num_workers` worker processes."""

    def __init__(self, split: PoseSplit, img_size: tuple[int, int], *, flip: Sequence[int],
                 scale_range: tuple[float, float] = (0.75, 1.25), rotation: float = 30.0, num_workers: int = 0,
                 codec: str = "continuous", **kw):
        """codec: 'continuous' (fastmae's crops) or 'udp' (ViTPose's evaluation crops, for its models)."""
        if codec == "udp" and kw.get("train"):
            raise ValueError("UDP crops are for evaluating a ViTPose model; fastmae trains on its own crops")
        samples = PoseSamples(split, tuple(img_size), flip, tuple(scale_range), rotation, kw.get("hflip", True),
                              kw["channels"], codec)
        super().__init__(samples, img_size=img_size, num_workers=num_workers, **kw)
        self.split = split


def unmap_keypoints(xy: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Crop keypoints (B, K, 2) -> image pixels through the inverse of each crop's matrix (B, 2, 3)."""
    return torch.stack([apply_matrix(invert_matrix(A), p) for A, p in zip(matrices, xy)])


def instance_score(keypoints: torch.Tensor) -> float:
    """An instance's score from its keypoints (K, 3) x y score: the mean of the scores above KEYPOINT_SCORE
    (mmpose's), or of all of them when none is above (mmpose gives those 0, which ties every such instance and
    ranks them at random in COCOeval; heatmap peaks of a well-trained small model can all lie below 0.2)."""
    good = keypoints[:, 2] > KEYPOINT_SCORE
    return float(keypoints[good, 2].mean()) if good.any() else float(keypoints[:, 2].mean())


def keypoint_list(keypoints: torch.Tensor) -> list[float]:
    """Keypoints (K, 3) -> COCO's flat [x1, y1, s1, ...], rounded to 1/1000 pixel."""
    return [round(v, 3) for v in keypoints.flatten().tolist()]
