"""`fastmae segment`: semantic segmentation on an encoder's patch map, scored by mIoU and pixel accuracy.

Shapes: B batch, C channels, H, W image, D width, h, w patch grid (H/p, W/p), K classes.
The encoder is built from any checkpoint `--init` accepts (or `random`) at the data's image size (position
embeddings resampled), with its final norm; `encode(encoder, x, "dense")` gives the (B, D, h, w) map. Heads:
linear (BatchNorm + 1x1 conv) or fpn (SimpleFeaturePyramid + a semantic-FPN fusion), logits upsampled
bilinearly to (B, K, H, W). The encoder is frozen unless --finetune (layer-wise lr decay). Training uses
trainer.fit (resume, checkpoints, preemption); the loss is per-pixel cross entropy with --seg.ignore_index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

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
    within,
)
from ..data.decode import normalize_uint8
from ..data.segmentation import (
    SCENE_CLASSES,
    SegLoader,
    SegSplit,
    check_labels,
    fashion_scenes,
    folder_split,
    infer_num_classes,
)
from ..figures.segmentation import save_seg_figure
from ..metrics.segmentation import confusion_counts, seg_metrics
from ..models.dense import DenseModel
from ..models.heads import SegmentationHead, build_seg_head
from ..tasks import dense_task_row
from ..train.dense import DatasetEvaluator, DenseParts, DenseTask, encoder_mode, percent, run_dense
from ..train.dist import all_reduce_mean
from ..train.runtime import Runtime
from ..weights.backbone import dense_encoder, encoder_kwargs

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae segment --help`).

@dataclass(frozen=True)
class SegDataConfig(AnnotatedSourceConfig):
    """Segmentation images: Fashion-MNIST scenes or an image folder (label maps: --seg.labels); batched at their
    own size, so no crop or held-out split."""

    source: Literal["fashion-mnist", "folder"] = "fashion-mnist"
    """fashion-mnist: scenes pasted from its items (--seg.*); folder: images under --data.path, label maps under
    --seg.labels."""


@dataclass(frozen=True)
class SegModelConfig(DenseModelConfig):
    """The encoder under a segmentation head (its patch tokens after the final norm, at the data's own size)."""


@dataclass(frozen=True)
class SegParams:
    """Segmentation data and head: Fashion-MNIST scenes (--data.source fashion-mnist) or image + label folders."""

    RULES: ClassVar[dict[str, Rule]] = {"num_classes": NON_NEGATIVE, "ignore_index": within(0, 255), "train_scenes": POSITIVE_INT,
                "eval_scenes": POSITIVE_INT, "scene_size": at_least(28, " (the Fashion-MNIST item size)"),
                "items": ((lambda v: len(v) == 2 and all(map(finite, v)) and 1 <= v[0] <= v[1]),
                          "(fewest, most) with 1 <= fewest <= most"),
                "fpn_channels": POSITIVE_INT, "figure_rows": NON_NEGATIVE,
                "eval_every": at_least(0, " (0 = only at the end)")}

    labels: str = ""
    """--data.source folder: the label maps of --data.path (the label of images/a/b.jpg is LABELS/a/b.png;
    'P' PNGs: palette index = class, 'L' PNGs: value = class)."""
    eval_labels: str = ""
    """--data.source folder: the label maps of --data.eval_path."""
    num_classes: int = 0
    """Classes, background included (0 = 1 + the largest training label; Fashion-MNIST scenes: 11)."""
    ignore_index: int = 255
    """Label value that is neither trained on nor scored."""
    train_scenes: int = 10000
    """Fashion-MNIST scenes built from the train split."""
    eval_scenes: int = 2000
    """Fashion-MNIST scenes built from the t10k split."""
    scene_size: int = 84
    """Scene height and width in pixels (a multiple of the encoder's patch size)."""
    items: tuple[int, int] = (2, 4)
    """Fewest and most Fashion-MNIST items pasted into one scene."""
    fpn_channels: int = 32
    """--head fpn: channels of the feature pyramid and the head (small for CPUs; ViTDet uses 256)."""
    eval_every: int = 0
    """Also score the evaluation split every N epochs (mIoU and pixel accuracy in log.jsonl and
    learning_curve.png; 0 = only at the end)."""
    figure_rows: int = 4
    """Evaluation images shown in segmentation.png."""


@dataclass(frozen=True)
class SegmentConfig:
    """Semantic segmentation on a frozen (or fine-tuned) encoder: mIoU and pixel accuracy on the evaluation split."""

    RULES: ClassVar[dict[str, Rule]] = {"layer_decay": ((lambda v: finite(v) and 0 < v <= 1), "in (0, 1]")}

    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, or 'random' for a randomly initialised encoder."""
    head: Literal["linear", "fpn"] = "linear"
    """linear: BatchNorm + 1x1 conv on the patch map; fpn: a simple feature pyramid (x4, x2, x1, x0.5 of the
    patch grid) fused by an FPN head. Logits are upsampled bilinearly to the image size."""
    finetune: bool = False
    """Train the encoder too (layer-wise lr decay, --layer_decay); default: frozen encoder, only the head trains."""
    layer_decay: float = 0.75
    """With --finetune: block i gets lr x layer_decay^(depth + 1 - i); the head gets the full lr."""
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    seg: SegParams = field(default_factory=SegParams)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=5, warmup_epochs=0.5, batch_size=64, blr=4e-3, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999)))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/segment"))


# ---------------------------------------------------------------------------------------------------
# Data.


def seg_splits(data: SegDataConfig, seg: SegParams, channels: int, seed: int) -> tuple[SegSplit, SegSplit, list[str], int]:
    """(train, eval, class names, K): Fashion-MNIST scenes or an image + label folder pair, labels checked."""
    if data.source == "fashion-mnist":
        args = (seg.scene_size, tuple(seg.items), seed)
        train = fashion_scenes(data.path, "train", seg.train_scenes, *args)
        val = fashion_scenes(data.path, "eval", seg.eval_scenes, *args)
        classes = list(SCENE_CLASSES)
    elif data.source == "folder":
        if not data.eval_path:
            raise ValueError("no evaluation data: pass --data.eval_path DIR (images) and --seg.eval_labels DIR "
                             "(their label PNGs)")
        frame = (data.max_image_pixels, data.apply_exif_orientation)
        train = folder_split(data.path, seg.labels, channels, ("--data.path", "--seg.labels"), *frame)
        val = folder_split(data.eval_path, seg.eval_labels, channels, ("--data.eval_path", "--seg.eval_labels"), *frame)
        if train.size != val.size:
            raise ValueError(f"evaluation images are {val.size} (HxW) but training images {train.size}; resize them "
                             f"to one size")
        classes = []
    else:
        raise ValueError(f"segment reads --data.source fashion-mnist (scenes) or folder (images + --seg.labels), "
                         f"not {data.source!r}")
    if data.limit > 0:
        train, val = (s.subset(data.limit) for s in (train, val))
    K = seg.num_classes or max(len(classes), infer_num_classes(train, seg.ignore_index))
    # K inferred from the training maps holds all of them: only given classes need the training maps read again
    for split in (train, val) if seg.num_classes else (val,):
        check_labels(split, K, seg.ignore_index)
    classes = (classes + [str(i) for i in range(len(classes), K)])[:K]
    return train, val, classes, K


def check_patch(size: tuple[int, int], patch: int, data: SegDataConfig, example: str) -> None:
    """ValueError unless the image size is a multiple of the encoder's patch size, naming the fix."""
    H, W = size
    if H % patch or W % patch:
        down, up = f"{H - H % patch}x{W - W % patch}", f"{-(-H // patch) * patch}x{-(-W // patch) * patch}"
        fit_to = f"e.g. {down} or {up} (HxW)" if H >= patch and W >= patch else f"at least {up} (HxW)"
        fix = (f"--seg.scene_size must be a multiple of {patch}" if data.source == "fashion-mnist" else
               f"crop or pad the images (and label maps) to a multiple of {patch}, {fit_to}")
        raise ValueError(f"images are {H}x{W} (HxW, e.g. {example}) but the encoder's patch size is {patch}: {fix}")


# ---------------------------------------------------------------------------------------------------
# Scoring and the figure's rows.


class SegEvaluator(DatasetEvaluator):
    """Confusion counts (K, K) of (label, prediction) over the valid pixels, summed over ranks -> mIoU, pixel
    accuracy, per-class IoU (no per-image predictions are kept)."""

    def __init__(self, head: SegmentationHead, classes: list[str], rt: Runtime):
        self.head, self.classes, self.rt = head, classes, rt

    def reset(self) -> None:
        K = len(self.classes)
        self.conf = torch.zeros(K * K, dtype=torch.float64, device=self.rt.device)

    def process(self, targets: torch.Tensor, outputs: torch.Tensor) -> None:
        pred = self.head.predict(outputs)  # (B, H, W)
        self.conf += confusion_counts(targets.to(pred.device), pred, len(self.classes), self.head.ignore_index)

    def evaluate(self) -> tuple[None, dict]:
        K = len(self.classes)
        conf = all_reduce_mean(self.conf, self.rt.dist) * self.rt.dist.world_size
        return None, seg_metrics(conf.round().long().cpu().view(K, K), self.classes)  # rows label, columns prediction


@torch.no_grad()
def figure_rows(model: DenseModel, loader: SegLoader, n: int) -> list[tuple]:
    """The first n evaluation samples as (image normalised, label, prediction) on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    rows = []
    for i in range(min(n, len(loader.split))):
        x, y = loader.sample(i)  # (C, H, W) uint8, (H, W)
        x = normalize_uint8(x, loader.mean, loader.std)
        rows.append((x, y, model.head.predict(model(x[None].to(device)))[0].cpu()))
    return rows


# ---------------------------------------------------------------------------------------------------
# The task.


class SegmentTask(DenseTask):
    """Semantic segmentation: a linear or FPN head on the patch map, images at their own size."""

    row, section = dense_task_row("segment"), "seg"
    metric, loss_label = ("miou", "mIoU (%)"), "loss (cross entropy)"

    def build(self, cfg: SegmentConfig, rt: Runtime, bb, data_cfg, channels: int, mean: tuple,
              std: tuple) -> DenseParts:
        d = rt.dist
        train, val, classes, K = seg_splits(data_cfg, cfg.seg, channels, cfg.run.seed)
        size = train.size
        check_patch(size, bb.model_kwargs["patch_size"], data_cfg, train.names[0])
        if cfg.model.img_size[0] and tuple(cfg.model.img_size) != size:
            raise ValueError(f"--model.img_size {cfg.model.img_size[0]} {cfg.model.img_size[1]} differs from the "
                             f"data's {size[0]}x{size[1]}; segment uses images at their own size: leave "
                             f"--model.img_size unset")
        common = dict(channels=channels, mean=mean, std=std, hflip=data_cfg.hflip, seed=cfg.run.seed, rank=d.rank,
                      world_size=d.world_size, num_classes=K, classes=classes, batch_size=cfg.optim.batch_size,
                      num_workers=data_cfg.num_workers)
        encoder = dense_encoder(bb, cfg.model, size, channels, cfg.finetune, cfg.model.drop_path)
        head = build_seg_head(cfg.head, encoder.embed_dim, K, encoder.patch_embed.patch_size[0], cfg.seg.ignore_index,
                              cfg.seg.fpn_channels)
        mode = encoder_mode(cfg)
        describe = (f"{cfg.head} head on {mode} {bb.source} (ViT {encoder.embed_dim}x{len(encoder.blocks)}, patch "
                    f"grid {encoder.grid_size[0]}x{encoder.grid_size[1]}) | {len(train)} train / {len(val)} eval "
                    f"images of {size[0]}x{size[1]}, {K} classes")
        return DenseParts(
            SegLoader(train, train=True, **common), SegLoader(val, train=False, drop_last=False, **common),
            DenseModel(encoder, head, cfg.finetune),
            {"encoder": {**encoder_kwargs(encoder), "img_size": list(size)}, "head": cfg.head, "num_classes": K,
             "fpn_channels": cfg.seg.fpn_channels, "ignore_index": cfg.seg.ignore_index},
            size, (len(train), len(val)), describe, meta={"classes": classes},
            result={"head": cfg.head, "num_classes": K, "classes": classes},
            state={"classes": classes, "mean": mean, "std": std})

    def evaluator(self, cfg: SegmentConfig, parts: DenseParts, rt: Runtime) -> SegEvaluator:
        return SegEvaluator(parts.model.head, parts.state["classes"], rt)

    def epoch_metrics(self, metrics: dict) -> dict:
        return {"miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"]}

    def write(self, cfg: SegmentConfig, parts: DenseParts, predictions: None, out_dir: Path) -> list[Path]:
        if not cfg.seg.figure_rows:
            return []
        rows = figure_rows(parts.model, parts.val_loader, cfg.seg.figure_rows)
        return [save_seg_figure(rows, out_dir / "segmentation.png", parts.state["mean"], parts.state["std"],
                                cfg.seg.ignore_index)]

    def summary(self, cfg: SegmentConfig, result: dict) -> str:
        mode = encoder_mode(cfg)
        return (f"segmentation ({cfg.head} head, {mode} {cfg.init}, {cfg.optim.epochs} epochs): mIoU "
                f"{percent(result['miou'])}  pixel accuracy {percent(result['pixel_acc'])}")


TASK = SegmentTask()


def run_segment(cfg: SegmentConfig) -> dict:
    """Train a segmentation head (and, with --finetune, the encoder); write segment.json and segmentation.png."""
    return run_dense(cfg, TASK)


__all__ = ["SegmentConfig", "SegmentTask", "TASK", "run_segment"]
