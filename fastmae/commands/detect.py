"""`fastmae detect`: object detection on an encoder's patch map, COCO in and out, scored by pycocotools.

Shapes: B batch, C channels, H, W canvas (--model.img_size), D width, K classes, n boxes of an image.
The encoder is built from any checkpoint `--init` accepts (or `random`) at the canvas size (position embeddings
resampled); `DenseModel` puts a CenterNet-style head (models/detection.py) on its (B, D, h, w) map, frozen unless
--finetune (layer-wise lr decay). Images are letterboxed onto the canvas (training: a random scale of the fit,
a random place, a flip; boxes mapped with them); predictions are mapped back to each image's own pixels.
Training runs through trainer.fit (resume, checkpoints, preemption, DDP). Outputs: detect.json (box AP by
pycocotools' COCOeval), detections.json (COCO results of the evaluation split) and detections.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from PIL import ImageDraw

from ..config import (
    NON_NEGATIVE,
    POSITIVE_INT,
    AnnotatedSourceConfig,
    DenseModelConfig,
    OptimConfig,
    Rule,
    RunConfig,
    at_least,
    finite,
)
from ..data.build import holdout_indices
from ..data.detection import (
    DetLoader,
    DetSplit,
    detection_records,
    fashion_det_scenes,
    read_coco,
    subset,
    warn_empty_classes,
)
from ..figures.grid import enlargement, save_grid, to_pil
from ..figures.predictions import drawn_detections, place_label
from ..metrics.detection import coco_box_metrics
from ..models.dense import DenseModel
from ..models.detection import CenterNetHead, auto_strides, check_strides
from ..tasks import dense_task_row
from ..train.dense import (DatasetEvaluator, DenseParts, DenseTask, check_multiple, encoder_mode, percent,
                           run_dense)
from ..train.dist import gather_objects
from ..train.runtime import Runtime
from ..weights.backbone import dense_encoder, encoder_kwargs
from ..weights.checkpoint import atomic_write_text

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae detect --help`).


@dataclass(frozen=True)
class DetDataConfig(AnnotatedSourceConfig):
    """Detection images: Fashion-MNIST scenes (one box per pasted item) or COCO instances files."""

    RULES: ClassVar[dict[str, Rule]] = {"holdout": at_least(0, " (0 = the source's own evaluation split)")}

    source: Literal["fashion-mnist", "coco"] = "fashion-mnist"
    """fashion-mnist: scenes pasted from its items (--det.*); coco: images under --data.path named by
    --det.annotations (and --data.eval_path with --det.eval_annotations)."""
    holdout: int = 0
    """Score on N images held out of the training data instead of the evaluation split, to choose a recipe
    without touching the evaluation images: N of --det.annotations' images (a fixed random split), or for the
    built-in scenes N scenes pasted from 10,000 training items that no training scene uses."""


@dataclass(frozen=True)
class DetModelConfig(DenseModelConfig):
    """The encoder under the detection head (its patch tokens after the final norm, at --model.img_size)."""


@dataclass(frozen=True)
class DetParams:
    """Detection data and head."""

    RULES: ClassVar[dict[str, Rule]] = {
        "train_scenes": POSITIVE_INT, "eval_scenes": POSITIVE_INT,
        "scene_size": at_least(28, " (the Fashion-MNIST item size)"),
        "nms_iou": ((lambda v: finite(v) and 0 < v <= 1), "in (0, 1] (1 = no suppression)"),
        "box_weight": ((lambda v: finite(v) and v >= 0), ">= 0"),
        "items": ((lambda v: len(v) == 2 and all(map(finite, v)) and 1 <= v[0] <= v[1]),
                  "(fewest, most) with 1 <= fewest <= most"),
        "channels": POSITIVE_INT, "max_detections": POSITIVE_INT, "figure_rows": NON_NEGATIVE,
        "eval_every": at_least(0, " (0 = only at the end)"),
        "figure_score": ((lambda v: finite(v) and 0 <= v <= 1), "in [0, 1]"),
        "scale_range": ((lambda v: len(v) == 2 and all(map(finite, v)) and 0 < v[0] <= v[1] <= 1),
                        "(min, max) with 0 < min <= max <= 1"),
    }

    annotations: str = ""
    """--data.source coco: the COCO instances JSON of --data.path (e.g. instances_train2017.json)."""
    eval_annotations: str = ""
    """--data.source coco: the COCO instances JSON of --data.eval_path."""
    train_scenes: int = 4000
    """Fashion-MNIST scenes built from the train split."""
    eval_scenes: int = 1000
    """Fashion-MNIST scenes built from the t10k split."""
    scene_size: int = 84
    """Scene height and width in pixels (the canvas when --model.img_size is unset)."""
    items: tuple[int, int] = (2, 4)
    """Fewest and most Fashion-MNIST items pasted into one scene."""
    strides: tuple[int, ...] = ()
    """The pyramid levels the head reads, as output strides in pixels (each the patch size times a power of two,
    increasing); an object goes to the level whose range holds its longer side (up to 8 x stride, the last level
    takes the rest). Default: the patch grid and two coarser levels, strides p, 2p, 4p for patch p (4 8 16 for
    patch 4), those with at least 2 x 2 cells; ViTDet's finer levels (e.g. 8 for patch 16) by naming them."""
    channels: int = 64
    """Channels of the head (pyramid levels and the branches shared by every level)."""
    max_detections: int = 100
    """Detections kept per image (the top heatmap peaks after suppression), as COCO's maxDets."""
    nms_iou: float = 0.6
    """Suppression: a detection overlapping a better one of its class (of any class with --det.class_agnostic) by
    IoU above this is dropped, across levels (1 = keep all peaks)."""
    class_agnostic: bool = False
    """Suppress across classes too, so each object gets one box and one label. Off by default, as in detectron2
    and mmdet: a second class's guess on an object is often right (Fashion-MNIST's tops), and keeping it scored
    4 box AP more on held-out scenes (BENCHMARKS.md "Detection")."""
    box_weight: float = 5.0
    """Weight of the GIoU box loss against the focal heatmap loss (TTFNet's)."""
    scale_range: tuple[float, float] = (0.6, 1.0)
    """Training scale augmentation: each image is resized to a random fraction in this range of the scale that
    fits it onto the canvas, at a random place (boxes mapped with it)."""
    eval_every: int = 0
    """Also score the evaluation split every N epochs (box mAP and AP50 in log.jsonl and learning_curve.png;
    0 = only at the end)."""
    figure_rows: int = 4
    """Evaluation images shown in detections.png."""
    figure_score: float = 0.3
    """Detections drawn in detections.png: those scoring at least this, each object once (the best label of
    boxes overlapping above IoU 0.6; detections.json keeps them all)."""


@dataclass(frozen=True)
class DetectConfig:
    """Object detection on a frozen (or fine-tuned) encoder: box AP (pycocotools) on the evaluation split."""

    RULES: ClassVar[dict[str, Rule]] = {"layer_decay": ((lambda v: finite(v) and 0 < v <= 1), "in (0, 1]")}

    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, or 'random' for a randomly initialised encoder."""
    finetune: bool = False
    """Train the encoder too (layer-wise lr decay, --layer_decay); default: frozen encoder, only the head trains."""
    layer_decay: float = 0.75
    """With --finetune: block i gets lr x layer_decay^(depth + 1 - i); the head gets the full lr."""
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    det: DetParams = field(default_factory=DetParams)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=10, warmup_epochs=1.0, batch_size=32, blr=1.6e-2, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999)))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/detect"))


# ---------------------------------------------------------------------------------------------------
# Data.


def det_splits(data: DetDataConfig, det: DetParams, channels: int, seed: int) -> tuple[DetSplit, DetSplit]:
    """(train, eval): Fashion-MNIST scenes or COCO files, the evaluation split on the training split's classes;
    with --data.holdout, the evaluation split is held out of the training data (the source's own is not read)."""
    if data.source == "fashion-mnist":
        args = (det.scene_size, tuple(det.items), seed)
        if data.holdout:  # scenes of held-out training items: no item is both trained on and scored
            train = fashion_det_scenes(data.path, "train", det.train_scenes, *args, holdout=True)
            val = fashion_det_scenes(data.path, "holdout", data.holdout, *args, holdout=True)
        else:
            train = fashion_det_scenes(data.path, "train", det.train_scenes, *args)
            val = fashion_det_scenes(data.path, "eval", det.eval_scenes, *args)
    else:
        if not det.annotations:
            raise ValueError("--data.source coco needs --det.annotations FILE (the COCO instances JSON of --data.path)")
        if not data.holdout and not (data.eval_path and det.eval_annotations):
            raise ValueError("no evaluation data: pass --data.eval_path DIR (images) and --det.eval_annotations FILE "
                             "(their COCO instances JSON), or --data.holdout N")
        if data.holdout and (data.eval_path or det.eval_annotations):
            raise ValueError("--data.holdout takes the evaluation images from the training annotations, so "
                             "--data.eval_path / --det.eval_annotations would be ignored: pass one of the two")
        frame = {"max_image_pixels": data.max_image_pixels, "upright": data.apply_exif_orientation}
        train = read_coco(data.path, det.annotations, channels, ("--data.path", "--det.annotations"), **frame)
        if data.holdout:
            n = len(train.images)
            train, val = (subset(train, holdout_indices(n, data.holdout, side).tolist()) for side in ("train", "eval"))
        else:
            val = read_coco(data.eval_path, det.eval_annotations, channels,
                            ("--data.eval_path", "--det.eval_annotations"),
                            categories=list(zip(train.category_ids, train.classes)), **frame)
    if data.limit > 0:
        train, val = (subset(s, range(min(data.limit, len(s.images)))) for s in (train, val))
    if not train.images:
        raise ValueError("the training annotations list no images; pass annotations with images")
    if not any(len(b) for b in val.boxes):
        where = f"{det.eval_annotations}: " if data.source == "coco" and not data.holdout else ""
        raise ValueError(f"{where}the evaluation split has no (non-crowd) box, so box AP cannot be computed; pass "
                         f"evaluation annotations with boxes")
    warn_empty_classes(train)
    return train, val


# ---------------------------------------------------------------------------------------------------
# Predictions, scores and the figure.


class DetEvaluator(DatasetEvaluator):
    """COCO results of every evaluation image (boxes in the image's own pixels, original ids), gathered from all
    ranks, scored by pycocotools' COCOeval. Each image's detections once, though DDP pads the ranks' shards with
    repeated images."""

    def __init__(self, head: CenterNetHead, split: DetSplit, rt: Runtime):
        self.head, self.split, self.rt = head, split, rt

    def reset(self) -> None:
        self.per_image: dict[int, list[dict]] = {}

    def process(self, targets: dict, outputs: dict) -> None:
        split = self.split
        for (boxes, scores, labels), s, i in zip(self.head.predict(outputs), targets["scale"], targets["index"]):
            self.per_image[i] = [{"image_id": split.image_ids[i], **r} for r in
                                 detection_records(boxes, scores, labels, s, split.images.hw(i), split.category_ids)]

    def evaluate(self) -> tuple[list[dict], dict]:
        merged = {i: dets for part in gather_objects(self.per_image, self.rt.dist) for i, dets in part.items()}
        results = [r for i in sorted(merged) for r in merged[i]]
        return results, {**coco_box_metrics(self.split.coco, results), "detections": len(results)}


def save_det_figure(split: DetSplit, results: list[dict], path: Path, rows: int, min_score: float) -> Path:
    """Per evaluation image: ground truth (green) and detections scoring >= min_score (red, with class and score;
    each object once, `drawn_detections`)."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    names = dict(zip(split.category_ids, split.classes))
    cells = []
    for i in range(min(rows, len(split.images))):
        img = split.images.load_for_display(i).float() / 255  # in colour, whatever the encoder reads
        h, w = img.shape[-2:]
        scale = enlargement(h, w, 168)
        panels = []
        for kind in ("ground truth", "detections"):
            pil = to_pil(img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3], scale).convert("RGB")
            draw = ImageDraw.Draw(pil)
            if kind == "ground truth":
                items = [(b, split.classes[c], None) for b, c in zip(split.boxes[i].tolist(), split.labels[i].tolist())]
                colour = (40, 200, 40)
            else:
                items = [([r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]],
                          names[r["category_id"]], r["score"])
                         for r in drawn_detections(by_image.get(split.image_ids[i], []), min_score)]
                colour = (230, 40, 40)
            taken: list[tuple[float, float]] = []  # label places so far: two labels at one place are stacked
            for b, name, score in items:
                box = [v * scale for v in b]
                draw.rectangle(box, outline=colour, width=2)
                place_label(draw, (box[0] + 2, box[1] + 1), name if score is None else f"{name} {score:.2f}", taken,
                            colour)
            panels.append(pil)
        cells.append(panels)
    return save_grid(("ground truth", f"detections (score >= {min_score})"), cells, path)


# ---------------------------------------------------------------------------------------------------
# The task.


class DetectTask(DenseTask):
    """Object detection: a multi-level CenterNet head on the pyramid, images letterboxed onto the canvas."""

    row, section = dense_task_row("detect"), "det"
    metric, loss_label = ("map", "box mAP (%)"), "loss (focal + box)"

    def build(self, cfg: DetectConfig, rt: Runtime, bb, data_cfg, channels: int, mean: tuple,
              std: tuple) -> DenseParts:
        d = rt.dist
        train, val = det_splits(data_cfg, cfg.det, channels, cfg.run.seed)
        size = tuple(cfg.model.img_size) if cfg.model.img_size[0] else (cfg.det.scene_size, cfg.det.scene_size)
        patch = bb.model_kwargs["patch_size"]
        check_multiple(size, patch, "canvas")
        K = len(train.classes)
        common = dict(channels=channels, mean=mean, std=std, hflip=data_cfg.hflip, seed=cfg.run.seed, rank=d.rank,
                      world_size=d.world_size, num_classes=K, classes=train.classes, batch_size=cfg.optim.batch_size,
                      scale_range=tuple(cfg.det.scale_range), num_workers=data_cfg.num_workers)
        encoder = dense_encoder(bb, cfg.model, size, channels, cfg.finetune, cfg.model.drop_path)
        strides = check_strides(cfg.det.strides or auto_strides(patch, size), patch, size)
        head = CenterNetHead(encoder.embed_dim, K, patch, strides, cfg.det.channels, cfg.det.max_detections,
                             cfg.det.nms_iou, cfg.det.box_weight, cfg.det.class_agnostic)
        mode = encoder_mode(cfg)
        describe = (f"CenterNet head (strides {' '.join(map(str, strides))}) on {mode} {bb.source} (ViT {encoder.embed_dim}x"
                    f"{len(encoder.blocks)}, patch grid {encoder.grid_size[0]}x{encoder.grid_size[1]}) | "
                    f"{len(train.images)} train / {len(val.images)} eval images on a {size[0]}x{size[1]} canvas, "
                    f"{K} classes")
        return DenseParts(
            DetLoader(train, size, train=True, **common), DetLoader(val, size, train=False, drop_last=False, **common),
            DenseModel(encoder, head, cfg.finetune),
            {"encoder": {**encoder_kwargs(encoder), "img_size": list(size)}, "num_classes": K,
             "strides": list(strides), "channels": cfg.det.channels, "nms_iou": cfg.det.nms_iou,
             "box_weight": cfg.det.box_weight, "class_agnostic": cfg.det.class_agnostic},
            size, (len(train.images), len(val.images)), describe,
            meta={"classes": train.classes, "category_ids": train.category_ids},
            result={"num_classes": K, "classes": train.classes}, state={"val": val})

    def evaluator(self, cfg: DetectConfig, parts: DenseParts, rt: Runtime) -> DetEvaluator:
        return DetEvaluator(parts.model.head, parts.state["val"], rt)

    def epoch_metrics(self, metrics: dict) -> dict:
        return {"map": metrics["map"], "map50": metrics["map50"]}

    def write(self, cfg: DetectConfig, parts: DenseParts, results: list[dict], out_dir: Path) -> list[Path]:
        atomic_write_text(json.dumps(results), out_dir / "detections.json")
        if not cfg.det.figure_rows:
            return []
        return [save_det_figure(parts.state["val"], results, out_dir / "detections.png", cfg.det.figure_rows,
                                cfg.det.figure_score)]

    def summary(self, cfg: DetectConfig, result: dict) -> str:
        mode = encoder_mode(cfg)
        return (f"detection ({mode} {cfg.init}, {cfg.optim.epochs} epochs): box mAP {percent(result['map'])}  AP50 "
                f"{percent(result['map50'])}  AP75 {percent(result['map75'])}")


TASK = DetectTask()


def run_detect(cfg: DetectConfig) -> dict:
    """Train a detection head (and, with --finetune, the encoder); write detect.json, detections.json and
    detections.png."""
    return run_dense(cfg, TASK)


__all__ = ["DetectConfig", "DetectTask", "TASK", "run_detect"]
