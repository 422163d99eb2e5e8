"""`fastmae segment`: semantic segmentation on an encoder's patch map, scored by mIoU and pixel accuracy.

Shapes: B batch, C channels, H, W image, D width, h, w patch grid (H/p, W/p), K classes.
The encoder is built from any checkpoint `--init` accepts (or `random`) at the data's image size (position
embeddings resampled), with its final norm; `encode(encoder, x, "dense")` gives the (B, D, h, w) map. Heads:
linear (BatchNorm + 1x1 conv) or fpn (SimpleFeaturePyramid + a semantic-FPN fusion), logits upsampled
bilinearly to (B, K, H, W). The encoder is frozen unless --finetune (layer-wise lr decay). Training uses
trainer.fit (resume, checkpoints, preemption); the loss is per-pixel cross entropy with --seg.ignore_index.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from ..config import (
    NON_NEGATIVE,
    POSITIVE_INT,
    DenseModelConfig,
    OptimConfig,
    Rule,
    RunConfig,
    AnnotatedSourceConfig,
    at_least,
    finite,
    validate,
    within,
)
from ..data.build import source_norm_stats
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
from ..models.heads import FPNSegHead, LinearSegHead, SegmentationHead
from ..train.device import autocast
from ..train.dist import all_reduce_mean, print0
from ..train.engine import Task
from ..train.optim import build_adamw, param_groups_dense, schedule
from ..train.runtime import Runtime
from ..train.trainer import fit, model_meta, setup
from ..weights.backbone import data_for, dense_encoder, encoder_init, encoder_kwargs
from ..weights.checkpoint import atomic_write_text

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae segment --help`).

@dataclass(frozen=True)
class SegDataConfig(AnnotatedSourceConfig):
    """Segmentation images: Fashion-MNIST scenes or an image folder (label maps: --seg.labels); batched at their
    own size, so no crop, loader workers or held-out split."""

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
                "fpn_channels": POSITIVE_INT, "figure_rows": NON_NEGATIVE}

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
# The head.


def build_head(kind: str, dim: int, num_classes: int, patch_size: int, seg: SegParams) -> SegmentationHead:
    """The --head module for a D-wide patch map of stride `patch_size`."""
    if kind == "linear":
        return LinearSegHead(dim, num_classes, patch_size, seg.ignore_index)
    return FPNSegHead(dim, num_classes, patch_size, seg.ignore_index, seg.fpn_channels)


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
        if train.images.shape[-2:] != val.images.shape[-2:]:
            raise ValueError(f"evaluation images are {tuple(val.images.shape[-2:])} (HxW) but training images "
                             f"{tuple(train.images.shape[-2:])}; resize them to one size")
        classes = []
    else:
        raise ValueError(f"segment reads --data.source fashion-mnist (scenes) or folder (images + --seg.labels), "
                         f"not {data.source!r}")
    if data.limit > 0:
        train, val = (SegSplit(s.images[: data.limit], s.masks[: data.limit], s.names[: data.limit]) for s in (train, val))
    K = seg.num_classes or max(len(classes), infer_num_classes(train, seg.ignore_index))
    for split in (train, val):
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


@torch.no_grad()
def confusion_matrix(model: nn.Module, predict: Callable[[torch.Tensor], torch.Tensor], loader, num_classes: int,
                     ignore_index: int, rt: Runtime) -> torch.Tensor:
    """(K, K) int64 counts of (label, prediction) over the loader's valid pixels, summed over ranks; `predict` maps
    images (B, C, H, W) to classes (B, H, W) with `model` in eval mode."""
    model.eval()
    loader.set_epoch(0)
    conf = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=rt.device)
    for imgs, y in loader:
        imgs, y = imgs.to(rt.device), y.to(rt.device)
        with autocast(rt.device, rt.precision):
            pred = predict(imgs)  # (B, H, W)
        conf += confusion_counts(y, pred, num_classes, ignore_index)
    conf = all_reduce_mean(conf, rt.dist) * rt.dist.world_size
    return conf.round().long().cpu().view(num_classes, num_classes)  # (K, K): rows label, columns prediction


@torch.no_grad()
def figure_rows(model: DenseModel, split_loader: SegLoader, n: int, device: torch.device) -> list[tuple]:
    """The first n evaluation samples as (image, label, prediction) on the CPU."""
    split_loader.set_epoch(0)
    x, y = next(iter(split_loader))
    x, y = x[:n], y[:n]
    model.eval()
    pred = model.head.predict(model(x.to(device))).cpu()  # (n, H, W)
    return list(zip(x, y, pred))


# ---------------------------------------------------------------------------------------------------
# The command.


def run_segment(cfg: SegmentConfig) -> dict:
    """Train a segmentation head (and, with --finetune, the encoder); write segment.json and segmentation.png."""
    validate(cfg)
    rt = setup(cfg.run, cfg)
    d = rt.dist
    t0 = time.perf_counter()
    bb = encoder_init(cfg.init, cfg.model)
    data_cfg = data_for(bb, cfg.data)
    channels = data_cfg.channels or (1 if data_cfg.source == "fashion-mnist" else 3)
    train, val, classes, K = seg_splits(data_cfg, cfg.seg, channels, cfg.run.seed)
    size = tuple(train.images.shape[-2:])
    check_patch(size, bb.model_kwargs["patch_size"], data_cfg, train.names[0])
    if cfg.model.img_size[0] and tuple(cfg.model.img_size) != size:
        raise ValueError(f"--model.img_size {cfg.model.img_size[0]} {cfg.model.img_size[1]} differs from the data's "
                         f"{size[0]}x{size[1]}; segment uses images at their own size: leave --model.img_size unset")
    mean, std = source_norm_stats(data_cfg, channels)
    common = dict(channels=channels, mean=mean, std=std, hflip=data_cfg.hflip, seed=cfg.run.seed, rank=d.rank,
                  world_size=d.world_size, num_classes=K, classes=classes, batch_size=cfg.optim.batch_size)
    train_loader = SegLoader(train, train=True, **common)
    val_loader = SegLoader(val, train=False, drop_last=False, **common)
    encoder = dense_encoder(bb, cfg.model, size, channels, cfg.finetune, cfg.model.drop_path)
    head = build_head(cfg.head, encoder.embed_dim, K, encoder.patch_embed.patch_size[0], cfg.seg)
    model = DenseModel(encoder, head, cfg.finetune)
    model = model.to(rt.device)
    lr = schedule(cfg.optim, len(train_loader), d.world_size, train_loader.num_samples)
    groups = param_groups_dense(model, cfg.optim.weight_decay, cfg.finetune, cfg.layer_decay)
    optimizer = build_adamw(groups, lr.peak, cfg.optim.betas, rt.device)
    mode = "fine-tuned" if cfg.finetune else "frozen"
    print0(d, f"segment: {cfg.head} head on {mode} {bb.source} (ViT {encoder.embed_dim}x{len(encoder.blocks)}, "
              f"patch grid {encoder.grid_size[0]}x{encoder.grid_size[1]}) | {len(train.masks)} train / "
              f"{len(val.masks)} eval images of {size[0]}x{size[1]}, {K} classes | lr {lr.peak:.3g} | "
              f"{rt.precision_label} on {rt.device} x{d.world_size}")

    def loss_fn(m: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return head.loss(m(imgs), labels)

    meta = model_meta("segmenter", {"encoder": {**encoder_kwargs(encoder), "img_size": list(size)},
                                    "head": cfg.head, "num_classes": K, "fpn_channels": cfg.seg.fpn_channels},
                      cfg, mean=list(mean), std=list(std), init=cfg.init, classes=classes)
    task = Task(model, optimizer, loss=loss_fn, lr=lr, meta=meta, accum_iter=cfg.optim.accum_iter,
                clip_grad=cfg.optim.clip_grad)
    prog, last = fit(rt, task, train_loader, cfg.optim.epochs)
    if prog.epoch < cfg.optim.epochs:  # stopped by a signal: the checkpoint is saved, run again to resume
        return {"epochs_done": prog.epoch, "last_checkpoint": str(last) if last else None}
    result = seg_metrics(confusion_matrix(model, lambda x: head.predict(model(x)), val_loader, K, cfg.seg.ignore_index, rt), classes)
    result.update(init=cfg.init, head=cfg.head, finetune=cfg.finetune, epochs=cfg.optim.epochs, num_classes=K,
                  classes=classes,
                  train=len(train.masks), eval=len(val.masks), image_size=list(size), lr=lr.peak,
                  seconds=time.perf_counter() - t0, last_checkpoint=str(last) if last else None)
    if d.is_main:
        out = rt.out_dir / "segment.json"
        atomic_write_text(json.dumps(result, indent=2, sort_keys=True), out)
        fig = None
        if cfg.seg.figure_rows:
            rows = figure_rows(model, val_loader, cfg.seg.figure_rows, rt.device)
            fig = save_seg_figure(rows, rt.out_dir / "segmentation.png", mean, std, cfg.seg.ignore_index)
        print0(d, f"segmentation ({cfg.head} head, {mode} {cfg.init}, {cfg.optim.epochs} epochs): mIoU "
                  f"{result['miou']:.2f}%  pixel accuracy {result['pixel_acc']:.2f}%  ({out}{', ' + str(fig) if fig else ''})")
    return result


__all__ = ["run_segment"]
