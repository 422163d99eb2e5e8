"""A trained model applied to an `ImageSet`, one function per task, each through the loader and decode its training
command evaluates with (so predicting on the evaluation images gives what the evaluation scored):

- `classify`: the evaluation crop (resize to cover, centre crop), softmax, top-k;
- `detect`: letterboxed onto the canvas, CenterNet peaks mapped back to the image (`detection_records`);
- `segment`: letterboxed onto the training size, logits cut to the image and resized to it, argmax;
- `pose`: top-down crops of given boxes (x1.25, the crop's aspect ratio), flip test, DARK decode, keypoints mapped
  back through each crop's matrix, the instance score as evaluation's times the box's score.

Shapes: B batch, C channels, H, W the model's input, h, w an image's own size, K classes (keypoints for pose).
Records are COCO results fields in the image's own pixels, one list per image (classification: one dict).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.decode import UnreadableImageError, load_image
from ..data.dense import DenseLoader, DenseSamples, to_uint8
from ..data.detection import DetLoader, DetSplit, detection_records, placed_size
from ..data.pose import PoseLoader, PoseSplit, instance_score, keypoint_list, udp_keypoints, unmap_keypoints
from ..models.pose import DARK_KERNEL, dark_decode
from ..train.dense import DatasetEvaluator, inference
from .images import ImageSet
from .models import TaskModel


HF_DARK_SIGMA = 0.8  # transformers' VitPose post-processing blurs with scipy's gaussian_filter(sigma=0.8), radius 5


@dataclass(frozen=True)
class Settings:
    """How to run: batch size, loader workers, device and precision (resolved)."""

    batch_size: int = 32
    num_workers: int = 0
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"


def loader_kw(tm: TaskModel, s: Settings) -> dict:
    """What every inference loader shares: no augmentation, every image, in order."""
    return dict(channels=tm.channels, mean=tm.mean, std=tm.std, hflip=False, seed=0, batch_size=s.batch_size,
                num_workers=s.num_workers, train=False, drop_last=False)


def _empty_split(images: ImageSet, tm: TaskModel) -> DetSplit:
    """The images as a detection split without boxes: what letterboxing onto the canvas reads."""
    none = [torch.zeros(0, 4)] * len(images)
    return DetSplit(images.store, none, [torch.zeros(0, dtype=torch.int64)] * len(images), list(range(len(images))),
                    images.names, tm.classes or ["0"], tm.category_ids or [1])


class Collect(DatasetEvaluator):
    """Per-image results of a pass, made by `per_batch(targets, outputs) -> {index: result}`."""

    def __init__(self, per_batch: Callable[[Any, Any], dict]):
        self.per_batch = per_batch

    def reset(self) -> None:
        self.results: dict[int, Any] = {}

    def process(self, targets: Any, outputs: Any) -> None:
        self.results.update(self.per_batch(targets, outputs))

    def evaluate(self) -> tuple[dict[int, Any], dict]:
        return self.results, {}


# ---------------------------------------------------------------------------------------------------
# Classification.


class ClassifySamples(DenseSamples):
    """Image i through the evaluation transform of `fastmae finetune` (load_image, train False), as uint8."""

    def __init__(self, images: ImageSet, tm: TaskModel, max_image_pixels: int = 0):
        self.images, self.tm, self.max_image_pixels = images.store, tm, max_image_pixels

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, i: int, g: torch.Generator | None) -> tuple[torch.Tensor, int]:
        tm = self.tm
        try:
            x = load_image(self.images.files[i], tm.size, tm.channels, tm.mean, tm.std, train=False, uint8=True,
                           max_image_pixels=self.max_image_pixels)  # (C, H, W)
        except UnreadableImageError as e:  # its header was read when the images were listed: the body is broken
            raise e.without_skip_hint() from None
        if x.dtype != torch.uint8:  # a 16-bit or float file comes normalised: back to 8-bit pixels for the batch
            m, s = torch.tensor(tm.mean).view(-1, 1, 1), torch.tensor(tm.std).view(-1, 1, 1)
            x = to_uint8(x * s + m)
        return x, i

    @staticmethod
    def collate(targets: list[int]) -> torch.Tensor:
        return torch.tensor(targets)


def classify(tm: TaskModel, images: ImageSet, s: Settings, topk: int = 5, max_image_pixels: int = 0) -> list[dict]:
    """One record per image: 'label' (class index), 'class_name', 'score' (softmax probability) and 'topk' (the
    k most probable classes as records of their own)."""
    loader = DenseLoader(ClassifySamples(images, tm, max_image_pixels), img_size=tm.size,
                         **loader_kw(tm, s))
    k = min(topk, len(tm.classes))

    def per_batch(index: torch.Tensor, logits: torch.Tensor) -> dict:
        p, c = logits.float().softmax(1).topk(k, 1)
        out = {}
        for i, ps, cs in zip(index.tolist(), p.cpu().tolist(), c.cpu().tolist()):
            top = [{"label": c_, "class_name": tm.classes[c_], "score": p_} for p_, c_ in zip(ps, cs)]
            out[i] = {**top[0], "topk": top}
        return out

    results, _ = inference(tm.model, tm.model, loader, Collect(per_batch), s.device, s.precision)
    return [results[i] for i in range(len(images))]


# ---------------------------------------------------------------------------------------------------
# Detection.


def detect(tm: TaskModel, images: ImageSet, s: Settings) -> list[list[dict]]:
    """Per image its detections: 'category_id', 'class_name', 'bbox' [x, y, w, h], 'score', best first."""
    split = _empty_split(images, tm)
    loader = DetLoader(split, tm.size, scale_range=(1.0, 1.0), num_classes=len(tm.classes), classes=tm.classes,
                       **loader_kw(tm, s))
    head = tm.model.head
    name_of = dict(zip(tm.category_ids, tm.classes))

    def per_batch(targets: dict, outputs: Any) -> dict:
        out = {}
        for (boxes, scores, labels), scale, i in zip(head.predict(outputs), targets["scale"], targets["index"]):
            recs = detection_records(boxes, scores, labels, scale, images.store.hw(i), tm.category_ids)
            out[i] = [{"category_id": r["category_id"], "class_name": name_of[r["category_id"]], "bbox": r["bbox"],
                       "score": r["score"]} for r in recs]
        return out

    results, _ = inference(tm.model, tm.model, loader, Collect(per_batch), s.device, s.precision)
    return [results[i] for i in range(len(images))]


# ---------------------------------------------------------------------------------------------------
# Segmentation.


def segment(tm: TaskModel, images: ImageSet, s: Settings, consume: Callable[[int, np.ndarray], None]) -> None:
    """Each image's label map (h, w) uint8 (class indices) handed to `consume(index, mask)` as its batch finishes
    (masks are not all held). An image of the training size is read as evaluation reads it; another size is
    letterboxed onto it (scale to fit, top left), and the logits of its part are resized back to the image."""
    split = _empty_split(images, tm)
    loader = DetLoader(split, tm.size, scale_range=(1.0, 1.0), num_classes=len(tm.classes), classes=tm.classes,
                       **loader_kw(tm, s))

    def per_batch(targets: dict, logits: torch.Tensor) -> dict:
        for x, scale, i in zip(logits, targets["scale"], targets["index"]):  # x: (K, H, W)
            h, w = images.store.hw(i)
            nh, nw = placed_size(h, w, scale)
            x = x[:, :nh, :nw].float()
            if (nh, nw) != (h, w):
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            consume(i, x.argmax(0).to(torch.uint8).cpu().numpy())
        return {}

    inference(tm.model, tm.model, loader, Collect(per_batch), s.device, s.precision)


# ---------------------------------------------------------------------------------------------------
# Pose.


def pose(tm: TaskModel, images: ImageSet, boxes: Sequence[Sequence[tuple[list[float], float]]], s: Settings,
         flip_test: bool = True, category_id: int | None = None) -> tuple[list[list[dict]], list[torch.Tensor]]:
    """Per image, one record per box (boxes[i]: ([x, y, w, h], box score) in image i's pixels): 'category_id'
    (the model's, or `category_id`), 'keypoints' [x, y, score] * K, 'score' (the keypoints' instance score times
    the box's) and 'bbox'; and every instance's keypoints (K, 3) in box order (for PCK)."""
    model = tm.model
    owner = [i for i, bs in enumerate(boxes) for _ in bs]
    flat = [b for bs in boxes for b in bs]
    results: dict[int, list[dict]] = {i: [] for i in range(len(images))}
    if not flat:
        return [results[i] for i in range(len(images))], []
    K = len(model.names)
    cid = int(tm.extra.get("category_id", 1)) if category_id is None else category_id
    split = PoseSplit(images.store, list(range(len(images))), images.names, torch.tensor(owner),
                      torch.tensor([b for b, _ in flat], dtype=torch.float32).view(-1, 4),
                      torch.zeros(len(flat), K, 3), list(model.names), list(model.skeleton), cid,
                      str(tm.extra.get("category", "object")))
    codec = getattr(model, "codec", "continuous")
    loader = PoseLoader(split, tm.size, flip=model.flip, codec=codec, **loader_kw(tm, s))

    def per_batch(targets: dict, heatmaps: torch.Tensor) -> dict:
        if codec == "udp":  # a ViTPose model: decoded as transformers' VitPose post-processing decodes
            xy, scores = dark_decode(heatmaps.float(), DARK_KERNEL, sigma=HF_DARK_SIGMA, keep_max=False, bounded=False)
            xy = udp_keypoints(xy.cpu(), targets["matrix"], tm.size, tuple(heatmaps.shape[-2:]))
        else:  # as `fastmae pose` evaluates
            xy, scores = model.head.predict(heatmaps.float())
            xy = unmap_keypoints(xy.cpu(), targets["matrix"])  # (B, K, 2) image pixels
        return {j: torch.cat([p, sc[:, None]], 1) for j, p, sc in zip(targets["index"].tolist(), xy, scores.cpu())}

    forward = model.flip_test if flip_test else model
    kps, _ = inference(forward, model, loader, Collect(per_batch), s.device, s.precision)
    for j in range(len(flat)):
        box, box_score = flat[j]
        results[owner[j]].append({"category_id": cid, "keypoints": keypoint_list(kps[j]),
                                  "score": instance_score(kps[j]) * box_score, "bbox": [float(v) for v in box]})
    return [results[i] for i in range(len(images))], [kps[j] for j in range(len(flat))]


def whole_image_boxes(images: ImageSet) -> list[list[tuple[list[float], float]]]:
    """One box per image, the whole image, score 1: pose without a detector or boxes."""
    return [[([0.0, 0.0, float(w), float(h)], 1.0)] for h, w in images.store.sizes]


__all__ = ["ClassifySamples", "Collect", "Settings", "loader_kw", "classify", "detect", "pose", "segment", "whole_image_boxes"]
