"""A trained model as inference needs it: `read_task_model(path)` -> `TaskModel` (the network in eval mode, what it
was trained for, its input size, channels and normalisation, class names and COCO ids, keypoint layout).

Reads every run that trained a head: `fastmae finetune` (a classifier), `linprobe` (a linear head on the encoder it
names), `segment`, `detect` and `pose` runs, and Hugging Face VitPose folders; pretraining runs and other encoders
read as kind 'features' (the Python API gives their features, as `embed`). Weights load strictly.

Shapes: H, W the model's input, C its channels, K classes (or keypoints for pose).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from ..api import load, load_exactly, load_pose
from ..config import EncoderConfig
from ..data.sources import FASHION_MNIST_CLASSES
from ..models.dense import DenseModel
from ..models.detection import CenterNetHead
from ..models.heads import LinearHead, build_seg_head
from ..models.vit import VisionTransformer
from ..weights.backbone import build_classifier, encoder_init
from ..weights.checkpoint import load_checkpoint
from ..weights.read import default_stats, find_source, read_pose

@dataclass
class TaskModel:
    """A trained network and what applying it needs. task: 'classifier', 'segmenter', 'detector', 'pose' or
    'features'; size: its input (H, W); classes: class names (detector: per contiguous index, with
    `category_ids`); extra: the task's own (pose: category_id, category; segmenter: ignore_index; classifier:
    pool for a linear probe)."""

    task: str
    model: nn.Module
    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    classes: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def encoder(self) -> nn.Module:
        """The ViT under the head (the model itself for a classifier or an encoder)."""
        return getattr(self.model, "encoder", self.model)


def _stats(meta: dict, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation a run recorded, else the defaults for its channel count."""
    mean, std = meta.get("mean"), meta.get("std")
    if mean and std and len(mean) == channels and len(std) == channels:
        return tuple(map(float, mean)), tuple(map(float, std))
    return default_stats(channels)


def _class_names(meta: dict, K: int) -> list[str]:
    """A classifier's class names: recorded with the run, Fashion-MNIST's for a run on it, else '0', '1', ..."""
    names = meta.get("classes") or []
    if not names and (meta.get("config") or {}).get("data", {}).get("source") == "fashion-mnist":
        names = list(FASHION_MNIST_CLASSES)
    return [str(n) for n in names][:K] + [str(i) for i in range(len(names), K)]


def _dense_encoder(kw: dict) -> VisionTransformer:
    """The encoder of a segment / detect checkpoint, as it was trained (final norm kept, no head)."""
    enc = {**kw["encoder"], "img_size": tuple(kw["encoder"]["img_size"])}
    return VisionTransformer(**enc, num_classes=0, global_pool="token")


def _dense_task(kind: str, state: dict, meta: dict, source: str) -> TaskModel:
    """A segment or detect run: its encoder and head, built from the checkpoint's kwargs."""
    kw = meta["model_kwargs"]
    encoder = _dense_encoder(kw)
    K, patch = int(kw["num_classes"]), int(kw["encoder"]["patch_size"])
    if kind == "segmenter":
        ignore = int(kw.get("ignore_index", (meta.get("config") or {}).get("seg", {}).get("ignore_index", 255)))
        head = build_seg_head(kw["head"], encoder.embed_dim, K, patch, ignore, int(kw.get("fpn_channels", 32)))
        extra = {"ignore_index": ignore}
    else:
        if "strides" not in kw:
            raise ValueError(f"{source} was trained by an earlier fastmae with the one-level detection head, which "
                             f"this version no longer builds; train it again with `fastmae detect`")
        det = (meta.get("config") or {}).get("det", {})
        head = CenterNetHead(encoder.embed_dim, K, patch, kw["strides"], int(kw["channels"]),
                             int(det.get("max_detections", 100)), float(kw["nms_iou"]), float(kw["box_weight"]),
                             bool(kw.get("class_agnostic", False)))
        extra = {}
    model = DenseModel(encoder, head)
    load_exactly(model, state["model"], f"cannot load {source} (not written by this fastmae's `{kind}` runs?)")
    channels = int(kw["encoder"]["in_chans"])
    classes = [str(c) for c in meta.get("classes") or range(K)]
    ids = [int(c) for c in meta.get("category_ids") or range(1, K + 1)]
    return TaskModel("segmenter" if kind == "segmenter" else "detector", model.eval(),
                     tuple(kw["encoder"]["img_size"]), channels, *_stats(meta, channels), source, classes, ids, extra)


def _linear_probe(kind: str, state: dict, meta: dict, source: str) -> TaskModel:
    """A linprobe run: the encoder it names (--init, read again) and its linear head."""
    cfg = meta.get("config") or {}
    init = meta.get("init") or cfg.get("init")
    if not init:
        raise ValueError(f"{source} is a linear probe that does not say which encoder it probed (no 'init' in its "
                         f"metadata); run `fastmae linprobe` again")
    model_cfg = EncoderConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.get("model", {}).items()
                                 if k in {f.name for f in dataclasses.fields(EncoderConfig)}})
    try:
        bb = encoder_init(init, model_cfg)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{source} is a linear probe of {init}, which is gone ({e}); a linear probe keeps "
                                f"only its head: put the encoder back there") from None
    encoder = build_classifier(bb, model_cfg, num_classes=0, in_chans=int(bb.model_kwargs.get("in_chans") or 3),
                               global_pool="token")
    K = int(meta.get("num_classes") or meta["model_kwargs"]["num_classes"])
    dim = int(meta.get("dim") or meta["model_kwargs"]["dim"])
    pool = meta.get("pool") or cfg.get("model", {}).get("global_pool", "token")
    head = LinearHead(dim, K)
    sd = state["model"]  # the head's own tensors (cached features), or the whole DenseModel's (--augment)
    if kind == "linprobe":
        sd = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    load_exactly(head, sd, f"cannot load the linear head of {source}")
    model = DenseModel(encoder, head, finetune=False, pool=pool)
    channels = int(encoder.patch_embed.in_chans)
    data = cfg.get("data", {})
    if meta.get("mean") and meta.get("std"):  # recorded by the run
        mean, std = _stats(meta, channels)
    elif data.get("mean") and data.get("std"):  # given to the run, else the encoder's (as `data_for`)
        mean, std = tuple(data["mean"]), tuple(data["std"])
    else:
        mean, std = (tuple(bb.mean), tuple(bb.std)) if bb.mean else default_stats(channels)
    return TaskModel("classifier", model.eval(), tuple(encoder.patch_embed.img_size), channels,
                     mean, std, source, _class_names(meta, K), extra={"pool": pool, "command": "linprobe"})


def read_task_model(path: str | Path, map_location: str = "cpu") -> TaskModel:
    """The trained model a path holds (see the module docstring), in eval mode on `map_location`. A training
    checkpoint is read once and dispatched on the kind its metadata records."""
    src = find_source(Path(path).expanduser())
    meta: dict = {}
    if src.is_file() and src.suffix == ".pt":
        state, meta = load_checkpoint(src)
        kind = meta.get("kind", "")
        if kind in ("segmenter", "detector"):
            tm = _dense_task(kind, state, meta, str(src))
        elif kind in ("linear_head", "linprobe"):
            tm = _linear_probe(kind, state, meta, str(src))
        else:
            tm = None
        if tm is not None:
            tm.model.to(map_location)
            return tm
    pw = read_pose(src) if src.suffix != ".pt" or meta.get("kind") == "pose" else None  # a pose run, HF VitPose
    if pw is not None:
        model = load_pose(pw)
        kw = pw.kwargs
        extra = {"category_id": int(pw.extra.get("category_id", 1)), "category": str(pw.extra.get("category", "person"
                 if len(model.names) == 17 else "object"))}
        return TaskModel("pose", model.to(map_location).eval(), tuple(kw["encoder"]["img_size"]),
                         int(kw["encoder"]["in_chans"]), pw.mean, pw.std, pw.source, [extra["category"]],
                         [extra["category_id"]], extra)
    model = load(src, map_location=map_location)
    channels = int(model.patch_embed.in_chans)
    size = tuple(model.patch_embed.img_size)
    if isinstance(model, VisionTransformer) and model.num_classes:
        return TaskModel("classifier", model, size, channels, model.data_mean, model.data_std, str(src),
                         _class_names(meta, model.num_classes),
                         extra={"pool": model.global_pool, "command": "finetune"})
    return TaskModel("features", model, size, channels, model.data_mean, model.data_std, str(src))


def require_head(tm: TaskModel, path: str) -> TaskModel:
    """The model unless it has no head (a pretraining run, an encoder): then one line saying what to do."""
    if tm.task == "features":
        raise ValueError(f"{path} holds an encoder without a trained head ({type(tm.model).__name__}): `fastmae "
                         f"predict` applies a classifier, segmenter, detector or pose model; for its features use "
                         f"`fastmae embed --init {path}` (or fastmae.predict in Python), or train a head on it "
                         f"(fastmae finetune / linprobe / segment / detect / pose)")
    return tm


__all__ = ["TaskModel", "read_task_model", "require_head"]
