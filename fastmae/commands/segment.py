"""`fastmae segment`: semantic segmentation on an encoder's patch map, scored by mIoU and pixel accuracy.

Shapes: B batch, C channels, H, W image, D width, h, w patch grid (H/p, W/p), K classes.
The encoder is built from any checkpoint `--init` accepts (or `random`) at the data's image size (position
embeddings resampled), with its final norm; `encode(encoder, x, "dense")` gives the (B, D, h, w) map. Heads:
linear (BatchNorm + 1x1 conv) or fpn (SimpleFeaturePyramid + a semantic-FPN fusion), logits upsampled
bilinearly to (B, K, H, W). The encoder is frozen unless --finetune (layer-wise lr decay). Training uses
trainer.fit (resume, checkpoints, preemption); the loss is per-pixel cross entropy with --seg.ignore_index.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..api import encode
from ..weights.backbone import build_classifier, data_for, encoder_init, encoder_kwargs
from ..weights.checkpoint import atomic_write_text
from ..config import SegDataConfig, SegmentConfig, SegParams, validate
from ..data.build import source_norm_stats
from ..data.segmentation import (
    SCENE_CLASSES,
    SegLoader,
    SegSplit,
    check_labels,
    fashion_scenes,
    folder_split,
    infer_num_classes,
    palette,
)
from ..train.device import autocast
from ..train.dist import all_reduce_mean, print0
from ..train.engine import Task
from ..train.optim import build_adamw, param_groups_lrd, param_groups_weight_decay, schedule
from ..models.pyramid import LayerNorm2d, SimpleFeaturePyramid
from ..train.trainer import Runtime, fit, model_meta, setup
from .visualize import enlargement, save_grid, to_pil

# ---------------------------------------------------------------------------------------------------
# Heads and the model.


class LinearSegHead(nn.Module):
    """BatchNorm without affine + 1x1 conv on the patch map: the linear probe of segmentation."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim, affine=False, eps=1e-6)
        self.cls = nn.Conv2d(dim, num_classes, 1)
        nn.init.trunc_normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.cls(self.bn(feats))  # (B, K, h, w)


class FPNSegHead(nn.Module):
    """SimpleFeaturePyramid, every level upsampled to the finest and summed, then 3x3 conv + LN + GELU + 1x1."""

    def __init__(self, dim: int, num_classes: int, channels: int = 64, scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(dim, channels, scales)
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels),
                                  nn.GELU())
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        levels = self.pyramid(feats)  # each (B, c, h*s, w*s)
        size = max((lv.shape[-2:] for lv in levels), key=lambda s: s[0] * s[1])
        fused = sum(F.interpolate(lv, size=size, mode="bilinear", align_corners=False) if lv.shape[-2:] != size else lv
                    for lv in levels)  # (B, c, h*s_max, w*s_max)
        return self.cls(self.fuse(fused))  # (B, K, h*s_max, w*s_max)


class Segmenter(nn.Module):
    """Encoder (frozen unless `finetune`) + head; forward gives (B, K, H, W) logits at the image size."""

    def __init__(self, encoder: nn.Module, head: nn.Module, finetune: bool):
        super().__init__()
        self.encoder, self.head, self.finetune = encoder, head, finetune
        if not finetune:
            for p in encoder.parameters():
                p.requires_grad_(False)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder's (B, D, h, w) map; without gradients (and in eval mode) when frozen."""
        if self.finetune:
            return encode(self.encoder, imgs, "dense")
        with torch.no_grad():
            self.encoder.eval()
            return encode(self.encoder, imgs, "dense")

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(imgs).float())  # (B, K, h', w')
        return F.interpolate(logits, size=imgs.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)


def build_head(kind: str, dim: int, num_classes: int, channels: int) -> nn.Module:
    """The --head module for a D-wide patch map."""
    return LinearSegHead(dim, num_classes) if kind == "linear" else FPNSegHead(dim, num_classes, channels)


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
        train = folder_split(data.path, seg.labels, channels, ("--data.path", "--seg.labels"))
        val = folder_split(data.eval_path, seg.eval_labels, channels, ("--data.eval_path", "--seg.eval_labels"))
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
        fit_to = f"{H - H % patch}x{W - W % patch}"
        fix = (f"--seg.scene_size must be a multiple of {patch}" if data.source == "fashion-mnist" else
               f"crop or pad the images (and label maps) to a multiple of {patch}, e.g. {fit_to} (HxW)")
        raise ValueError(f"images are {H}x{W} (HxW, e.g. {example}) but the encoder's patch size is {patch}: {fix}")


# ---------------------------------------------------------------------------------------------------
# Scoring and the figure.


@torch.no_grad()
def confusion_matrix(model: nn.Module, loader, num_classes: int, ignore_index: int, rt: Runtime) -> torch.Tensor:
    """(K, K) int64 counts of (label, prediction) over the loader's valid pixels, summed over ranks."""
    model.eval()
    loader.set_epoch(0)
    conf = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=rt.device)
    for imgs, y in loader:
        imgs, y = imgs.to(rt.device), y.to(rt.device)
        with autocast(rt.device, rt.precision):
            pred = model(imgs).argmax(1)  # (B, H, W)
        valid = y != ignore_index  # (B, H, W)
        conf += torch.bincount(y[valid] * num_classes + pred[valid], minlength=num_classes**2).double()
    conf = all_reduce_mean(conf, rt.dist) * rt.dist.world_size
    return conf.round().long().cpu().view(num_classes, num_classes)  # (K, K): rows label, columns prediction


def seg_metrics(conf: torch.Tensor, classes: list[str]) -> dict:
    """mIoU (mean over classes present in label or prediction), pixel accuracy and per-class IoU, all in %."""
    conf = conf.double()
    tp = conf.diag()  # (K,)
    union = conf.sum(0) + conf.sum(1) - tp  # (K,)
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))  # (K,)
    present = ~iou.isnan()
    total = conf.sum().item()
    return {
        "miou": 100.0 * iou[present].mean().item() if present.any() else 0.0,
        "pixel_acc": 100.0 * tp.sum().item() / max(total, 1),
        "per_class_iou": {c: (None if v != v else 100.0 * v) for c, v in zip(classes, iou.tolist())},
        "pixels": int(total),
    }


def save_seg_figure(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path, mean: tuple, std: tuple,
                    ignore_index: int, min_side: int = 168) -> Path:
    """image / ground truth / prediction, one row per (image (C, H, W) normalised, label (H, W), prediction (H, W))."""
    colours = palette(ignore_index)  # (256, 3)
    H, W = rows[0][1].shape
    scale = enlargement(H, W, min_side)
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def label_pil(y: torch.Tensor) -> Image.Image:
        return Image.fromarray(colours[y.long().clamp(0, 255)].numpy(), "RGB").resize((W * scale, H * scale),
                                                                                      Image.NEAREST)

    cells = [[to_pil((img * std_t + mean_t).clamp(0, 1), scale), label_pil(y), label_pil(pred)]
             for img, y, pred in rows]
    return save_grid(("image", "ground truth", "prediction"), cells, path)


@torch.no_grad()
def figure_rows(model: nn.Module, split_loader: SegLoader, n: int, device: torch.device) -> list[tuple]:
    """The first n evaluation samples as (image, label, prediction) on the CPU."""
    split_loader.set_epoch(0)
    x, y = next(iter(split_loader))
    x, y = x[:n], y[:n]
    model.eval()
    pred = model(x.to(device)).argmax(1).cpu()  # (n, H, W)
    return list(zip(x, y, pred))


# ---------------------------------------------------------------------------------------------------
# The command.


def _optimizer_groups(model: Segmenter, cfg: SegmentConfig) -> list[dict]:
    """Head: full lr with weight decay on weights; with --finetune, encoder groups with layer-wise lr decay."""
    groups = param_groups_weight_decay(model.head, cfg.optim.weight_decay)
    if cfg.finetune:
        groups += param_groups_lrd(model.encoder, cfg.optim.weight_decay, cfg.layer_decay)
    return [g for g in groups if g["params"]]


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
    encoder = build_classifier(bb, dataclasses.replace(cfg.model, img_size=size), num_classes=0, in_chans=channels,
                               global_pool="token", drop_path=cfg.model.drop_path if cfg.finetune else 0.0)
    model = Segmenter(encoder, build_head(cfg.head, encoder.embed_dim, K, cfg.seg.fpn_channels), cfg.finetune)
    model = model.to(rt.device)
    lr = schedule(cfg.optim, len(train_loader), d.world_size)
    optimizer = build_adamw(_optimizer_groups(model, cfg), lr.peak, cfg.optim.betas, rt.device)
    mode = "fine-tuned" if cfg.finetune else "frozen"
    print0(d, f"segment: {cfg.head} head on {mode} {bb.source} (ViT {encoder.embed_dim}x{len(encoder.blocks)}, "
              f"patch grid {encoder.grid_size[0]}x{encoder.grid_size[1]}) | {len(train.masks)} train / "
              f"{len(val.masks)} eval images of {size[0]}x{size[1]}, {K} classes | lr {lr.peak:.3g} | "
              f"{rt.precision_label} on {rt.device} x{d.world_size}")

    def loss_fn(m: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(imgs).float(), labels, ignore_index=cfg.seg.ignore_index)

    meta = model_meta("segmenter", {"encoder": {**encoder_kwargs(encoder), "img_size": list(size)},
                                    "head": cfg.head, "num_classes": K, "fpn_channels": cfg.seg.fpn_channels},
                      cfg, mean=list(mean), std=list(std), init=cfg.init, classes=classes)
    task = Task(model, optimizer, loss=loss_fn, lr=lr, meta=meta, accum_iter=cfg.optim.accum_iter,
                clip_grad=cfg.optim.clip_grad)
    prog, last = fit(rt, task, train_loader, cfg.optim.epochs)
    if prog.epoch < cfg.optim.epochs:  # stopped by a signal: the checkpoint is saved, run again to resume
        return {"epochs_done": prog.epoch, "last_checkpoint": str(last) if last else None}
    result = seg_metrics(confusion_matrix(model, val_loader, K, cfg.seg.ignore_index, rt), classes)
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


__all__ = ["FPNSegHead", "LinearSegHead", "Segmenter", "run_segment", "seg_metrics"]
