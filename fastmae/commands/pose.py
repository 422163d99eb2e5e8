"""`fastmae pose`: top-down 2D keypoints on an encoder's last map with a light heatmap head (ViTPose), COCO keypoints
in and out, scored by pycocotools (OKS AP) and PCK.

Shapes: B batch, C channels, H, W crop (--model.img_size), K keypoints. Each instance is cropped from its box
(data/pose.py: x1.25, the crop's aspect ratio, an affine warp; training adds scale, rotation and flip), the encoder
(any checkpoint --init accepts, a Hugging Face VitPose folder, or `random`) reads the crop as ViTPose does and a
simple or classic head gives K heatmaps (models/pose.py), frozen unless --finetune (layer-wise lr decay).
Predictions (flip test, DARK decode) go back to each image's pixels through the crop's inverse matrix. Training
runs through trainer.fit (resume, checkpoints, preemption, DDP). Outputs: pose.json (ap, ap50, ap75, ar by
COCOeval with the OKS sigmas used, pck, sigmas), keypoints.json (COCO results of the evaluation split), pose.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from PIL import ImageDraw

from ..config import (
    NON_NEGATIVE,
    POSITIVE_INT,
    AnnotatedSourceConfig,
    DenseModelConfig,
    OptimConfig,
    Rule,
    RunConfig,
    above,
    at_least,
    finite,
)
from ..data.pose import (
    PoseLoader,
    PoseSplit,
    apply_matrix,
    fashion_pose_scenes,
    instance_score,
    keypoint_list,
    pose_coco_dict,
    read_coco_keypoints,
    report_skipped,
    sigmas_for,
    unmap_keypoints,
)
from ..figures.grid import enlargement, save_grid, to_pil
from ..metrics.pose import coco_keypoint_metrics, pck
from ..models.pose import PoseModel, build_head, flip_index, set_norm_eps, vitpose_padding
from ..models.vit import LN_EPS
from ..tasks import dense_task_row
from ..train.dense import (DatasetEvaluator, DenseParts, DenseTask, check_multiple, encoder_mode, percent,
                           run_dense)
from ..train.dist import gather_objects, print0
from ..train.runtime import Runtime
from ..weights.backbone import dense_encoder, encoder_kwargs
from ..weights.checkpoint import atomic_write_text
from ..weights.read import read_pose

FASHION_CROP = (32, 32)  # the crop of the built-in task when --model.img_size is unset
COCO_CROP = (256, 192)  # ViTPose's crop for COCO files


# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae pose --help`).


@dataclass(frozen=True)
class PoseDataConfig(AnnotatedSourceConfig):
    """Keypoint images: Fashion-MNIST garment scenes (seven landmarks per garment) or COCO keypoints files."""

    source: Literal["fashion-mnist", "coco"] = "fashion-mnist"
    """fashion-mnist: scenes of warped garments (--pose.*); coco: images under --data.path named by
    --pose.annotations (and --data.eval_path with --pose.eval_annotations)."""


@dataclass(frozen=True)
class PoseModelConfig(DenseModelConfig):
    """The encoder under the pose head, at --model.img_size (the crop: default 32 32 on the built-in task, 256 192
    on COCO files)."""


@dataclass(frozen=True)
class PoseParams:
    """Keypoint data, head and evaluation."""

    RULES: ClassVar[dict[str, Rule]] = {
        "train_images": POSITIVE_INT, "eval_images": POSITIVE_INT,
        "scene_size": at_least(28, " (the Fashion-MNIST item size)"), "garments": POSITIVE_INT,
        "channels": POSITIVE_INT, "sigma": above(0), "figure_rows": NON_NEGATIVE,
        "figure_score": ((lambda v: finite(v) and v >= 0), ">= 0"),
        "eval_every": at_least(0, " (0 = only at the end)"),
        "sigmas": ((lambda v: all(finite(s) and s > 0 for s in v)), "positive"),
        "flip_pairs": ((lambda v: len(v) % 2 == 0 and all(i >= 0 for i in v)),
                       "an even number of 0-based keypoint indices (pairs)"),
        "scale_range": ((lambda v: len(v) == 2 and all(map(finite, v)) and 0 < v[0] <= v[1]),
                        "(min, max) with 0 < min <= max"),
        "rotation": ((lambda v: finite(v) and 0 <= v <= 180), "in [0, 180] degrees"),
    }

    annotations: str = ""
    """--data.source coco: the COCO keypoints JSON of --data.path (e.g. person_keypoints_train2017.json)."""
    eval_annotations: str = ""
    """--data.source coco: the COCO keypoints JSON of --data.eval_path."""
    train_images: int = 2000
    """Fashion-MNIST scenes built from the train split."""
    eval_images: int = 500
    """Fashion-MNIST scenes built from the t10k split."""
    scene_size: int = 64
    """Scene height and width in pixels."""
    garments: int = 2
    """Most garments in one scene (each has 1 to this many)."""
    head: Literal["simple", "classic"] = "simple"
    """simple: ReLU, bilinear x4, 3x3 conv (ViTPose-simple); classic: two 4x4 stride-2 deconvolutions + BatchNorm +
    ReLU, 1x1 conv (ViTPose)."""
    channels: int = 256
    """Width of the classic head's deconvolutions (256 in ViTPose and Hugging Face's VitPose)."""
    sigma: float = 2.0
    """Gaussian sigma of the heatmap targets in heatmap pixels (2 at ViTPose's 64x48)."""
    sigmas: tuple[float, ...] = ()
    """OKS sigmas, one per keypoint (empty: COCO's 17 for COCO's keypoint names, else 0.067 each)."""
    flip_pairs: tuple[int, ...] = ()
    """Keypoints that swap under a left-right flip, as pairs of 0-based indices (e.g. 1 2 3 4); empty: from the
    names (left_* <-> right_*)."""
    flip_test: bool = True
    """Average the heatmaps of each crop and its mirror image at evaluation (mmpose's flip test)."""
    scale_range: tuple[float, float] = (0.75, 1.25)
    """Training scale augmentation: the box is resized by a random factor in this range before cropping."""
    rotation: float = 30.0
    """Training rotation augmentation: up to this many degrees either way, on 60% of the crops (mmpose)."""
    eval_every: int = 0
    """Also score the evaluation split every N epochs (OKS AP and PCK in log.jsonl and learning_curve.png;
    0 = only at the end)."""
    figure_rows: int = 6
    """Evaluation instances shown in pose.png."""
    figure_score: float = 0.0
    """Predicted keypoints drawn in pose.png: those scoring at least this (heatmap peak values; 0: all)."""


@dataclass(frozen=True)
class PoseConfig:
    """2D keypoints on a frozen (or fine-tuned) encoder: OKS AP (pycocotools) and PCK on the evaluation split."""

    RULES: ClassVar[dict[str, Rule]] = {"layer_decay": ((lambda v: finite(v) and 0 < v <= 1), "in (0, 1]")}

    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, a `fastmae pose` run or Hugging Face VitPose folder (its head too when
    the keypoints and head match), or 'random' for a randomly initialised encoder."""
    recipe: Literal["", "vitpose"] = ""
    """A named recipe (fastmae/recipes.py) as the starting point; flags given with it override its values."""
    finetune: bool = False
    """Train the encoder too (layer-wise lr decay, --layer_decay); default: frozen encoder, only the head trains."""
    layer_decay: float = 0.75
    """With --finetune: block i gets lr x layer_decay^(depth + 1 - i); the head gets the full lr."""
    data: PoseDataConfig = field(default_factory=PoseDataConfig)
    model: PoseModelConfig = field(default_factory=PoseModelConfig)
    pose: PoseParams = field(default_factory=PoseParams)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=10, warmup_epochs=1.0, batch_size=64, blr=2e-3, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999)))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/pose"))


# ---------------------------------------------------------------------------------------------------
# Data.


def pose_splits(data: PoseDataConfig, pose: PoseParams, channels: int, seed: int) -> tuple[PoseSplit, PoseSplit]:
    """(train, eval): Fashion-MNIST garment scenes or COCO keypoints files."""
    if data.source == "fashion-mnist":
        args = (pose.scene_size, pose.garments, seed)
        train = fashion_pose_scenes(data.path, "train", pose.train_images, *args)
        val = fashion_pose_scenes(data.path, "eval", pose.eval_images, *args)
    else:
        if not pose.annotations:
            raise ValueError("--data.source coco needs --pose.annotations FILE (the COCO keypoints JSON of "
                             "--data.path)")
        if not (data.eval_path and pose.eval_annotations):
            raise ValueError("no evaluation data: pass --data.eval_path DIR (images) and --pose.eval_annotations FILE "
                             "(their COCO keypoints JSON)")
        frame = {"max_image_pixels": data.max_image_pixels, "upright": data.apply_exif_orientation}
        train = read_coco_keypoints(data.path, pose.annotations, channels, ("--data.path", "--pose.annotations"),
                                    **frame)
        val = read_coco_keypoints(data.eval_path, pose.eval_annotations, channels,
                                  ("--data.eval_path", "--pose.eval_annotations"), like=train, **frame)
    if data.limit > 0:
        train, val = (_limit(s, data.limit) for s in (train, val))
    for split, what in ((train, "training"), (val, "evaluation")):
        if not len(split.boxes):
            raise ValueError(f"the {what} annotations hold no instance with a box and a labelled keypoint; pass "
                             f"COCO keypoints annotations with some")
    return train, val


def _limit(split: PoseSplit, n: int) -> PoseSplit:
    """The first n instances of a split (and the ground truth of just those)."""
    out = PoseSplit(split.images, split.image_ids, split.names, split.owner[:n], split.boxes[:n], split.keypoints[:n],
                    split.keypoint_names, split.skeleton, split.category_id, split.category,
                    None if split.areas is None else split.areas[:n], skipped=split.skipped)
    out.coco = pose_coco_dict(out)
    return out


def flip_of(names: list[str], pairs: tuple[int, ...]) -> list[int]:
    """The flip index from --pose.flip_pairs (checked against K), else from the names."""
    K = len(names)
    if any(i >= K for i in pairs):
        raise ValueError(f"--pose.flip_pairs {list(pairs)} names keypoints beyond the {K} of the data (0..{K - 1})")
    twice = sorted({i for i in pairs if pairs.count(i) > 1})
    if twice or any(a == b for a, b in zip(pairs[::2], pairs[1::2])):
        raise ValueError(f"--pose.flip_pairs {list(pairs)} puts keypoint{'s' if len(twice) > 1 else ''} "
                         f"{twice or [a for a, b in zip(pairs[::2], pairs[1::2]) if a == b]} in more than one pair (or "
                         f"pairs one with itself); a flip swaps each keypoint with at most one partner")
    return flip_index(names, list(zip(pairs[::2], pairs[1::2])))


# ---------------------------------------------------------------------------------------------------
# Predictions, scores and the figure.


class PoseEvaluator(DatasetEvaluator):
    """Keypoints (K, 3) x y score in image pixels of every evaluation instance, gathered from all ranks by
    instance index; OKS AP by pycocotools' COCOeval with the run's sigmas, and PCK."""

    def __init__(self, head, split: PoseSplit, sigmas: list[float], rt: Runtime):
        self.head, self.split, self.sigmas, self.rt = head, split, sigmas, rt

    def reset(self) -> None:
        self.per_instance: dict[int, torch.Tensor] = {}

    def process(self, targets: dict, outputs: torch.Tensor) -> None:
        xy, scores = self.head.predict(outputs.float())
        xy = unmap_keypoints(xy.cpu(), targets["matrix"])  # (B, K, 2) image pixels
        for i, p, s in zip(targets["index"].tolist(), xy, scores.cpu()):
            self.per_instance[i] = torch.cat([p, s[:, None]], 1)

    def evaluate(self) -> tuple[dict[int, torch.Tensor], dict]:
        preds = {i: k for part in gather_objects(self.per_instance, self.rt.dist) for i, k in part.items()}
        split, order = self.split, sorted(preds)
        metrics = coco_keypoint_metrics(split.coco, coco_results(split, preds), self.sigmas)
        p = pck(torch.stack([preds[i][:, :2] for i in order]), split.keypoints[order], split.boxes[order])
        metrics["pck"] = {k.split("@")[1]: v for k, v in p.items()}
        return preds, metrics


def coco_results(split: PoseSplit, preds: dict[int, torch.Tensor]) -> list[dict]:
    """COCO keypoint results: one per instance, scored by `instance_score` (mmpose's rule)."""
    return [{"image_id": split.image_ids[int(split.owner[i])], "category_id": split.category_id,
             "keypoints": keypoint_list(preds[i]), "score": instance_score(preds[i])} for i in sorted(preds)]


def save_pose_figure(loader: PoseLoader, preds: dict[int, torch.Tensor], path: Path, rows: int,
                     min_score: float = 0.0) -> Path:
    """Per evaluation instance, its crop with the true (green) and the predicted (red) skeleton and keypoints (those
    scoring at least min_score)."""
    split = loader.split
    cells = []
    for i in range(min(rows, len(split.boxes))):
        crop, t = loader.sample(i, None)
        img = crop.float() / 255  # (C, H, W)
        scale = enlargement(*img.shape[-2:], 160)
        truth = torch.cat([t["keypoints"], t["weights"][:, None]], 1)  # (K, 3) crop pixels, labelled
        pred = preds[i].clone()
        pred[:, :2] = apply_matrix(t["matrix"], pred[:, :2])
        panels = []
        for kp, colour, shown in ((truth, (40, 200, 40), lambda v: v > 0.5), (pred, (230, 40, 40),
                                                                              lambda v: v >= min_score)):
            pil = to_pil(img, scale)
            draw = ImageDraw.Draw(pil)
            pts = [(float(x) * scale, float(y) * scale) if shown(v) else None for x, y, v in kp.tolist()]
            for a, b in split.skeleton:
                if pts[a] and pts[b]:
                    draw.line([pts[a], pts[b]], fill=colour, width=2)
            for p in pts:
                if p:
                    draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
            panels.append(pil)
        cells.append(panels)
    return save_grid(("ground truth", f"prediction (score >= {min_score:g})"), cells, path)


# ---------------------------------------------------------------------------------------------------
# The task.


class PoseTask(DenseTask):
    """Top-down 2D keypoints: ViTPose's simple or classic head on crops of each instance's box."""

    row, section = dense_task_row("pose"), "pose"
    metric, loss_label = ("ap", "OKS AP (%)"), "loss (heatmap MSE)"

    def build(self, cfg: PoseConfig, rt: Runtime, bb, data_cfg, channels: int, mean: tuple,
              std: tuple) -> DenseParts:
        d = rt.dist
        whole = read_pose(cfg.init) if cfg.init != "random" else None  # a pose model: its head may come along
        train, val = pose_splits(data_cfg, cfg.pose, channels, cfg.run.seed)
        for split, what in ((train, "training"), (val, "evaluation")):
            if report_skipped(split, what):
                print0(d, report_skipped(split, what))
        size = (tuple(cfg.model.img_size) if cfg.model.img_size[0]
                else FASHION_CROP if data_cfg.source == "fashion-mnist" else COCO_CROP)
        patch = bb.model_kwargs["patch_size"]
        check_multiple(size, patch, "crop")
        names, K = train.keypoint_names, len(train.keypoint_names)
        flip = flip_of(names, tuple(cfg.pose.flip_pairs))
        sigmas, sigmas_from = sigmas_for(names, cfg.pose.sigmas)
        common = dict(channels=channels, mean=mean, std=std, hflip=data_cfg.hflip, seed=cfg.run.seed, rank=d.rank,
                      world_size=d.world_size, batch_size=cfg.optim.batch_size, flip=flip,
                      scale_range=tuple(cfg.pose.scale_range), rotation=cfg.pose.rotation,
                      num_workers=data_cfg.num_workers)
        encoder = dense_encoder(bb, cfg.model, size, channels, cfg.finetune, cfg.model.drop_path)
        norm_eps = float(whole.kwargs.get("norm_eps", LN_EPS)) if whole else LN_EPS
        set_norm_eps(encoder, norm_eps)
        head = build_head(cfg.pose.head, encoder.embed_dim, K, patch, cfg.pose.sigma, cfg.pose.channels)
        head_from = "new"
        if whole and whole.kwargs["head"] == cfg.pose.head and int(whole.kwargs["num_keypoints"]) == K:
            own = head.state_dict()
            sd = {k[len("head."):]: v for k, v in whole.state_dict.items() if k.startswith("head.")}
            if {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in own.items()}:
                head.load_state_dict(sd, strict=True)
                head_from = f"from {cfg.init}"
        padding = int(whole.kwargs.get("patch_padding", 0)) if whole else vitpose_padding(patch)
        model = PoseModel(encoder, head, cfg.finetune, padding, names, flip, train.skeleton, sigmas)
        mode = encoder_mode(cfg)
        describe = (f"{cfg.pose.head} head ({head_from}) on {mode} {bb.source} (ViT {encoder.embed_dim}x"
                    f"{len(encoder.blocks)}, patch grid {encoder.grid_size[0]}x{encoder.grid_size[1]}) | "
                    f"{len(train.boxes)} train / {len(val.boxes)} eval instances, {K} keypoints, {size[0]}x{size[1]} "
                    f"crops | OKS sigmas {sigmas_from}")
        kwargs = {"encoder": {**encoder_kwargs(encoder), "img_size": list(size)}, "head": cfg.pose.head,
                  "num_keypoints": K, "channels": cfg.pose.channels, "sigma": cfg.pose.sigma,
                  "patch_padding": padding, "norm_eps": norm_eps, "names": names, "flip": flip,
                  "skeleton": [list(e) for e in train.skeleton], "sigmas": sigmas}
        result = {"sigmas": sigmas, "sigmas_from": sigmas_from, "head": cfg.pose.head, "num_keypoints": K,
                  "keypoints": names, "skipped": {"train": train.skipped, "eval": val.skipped},
                  "flip_test": cfg.pose.flip_test}
        return DenseParts(PoseLoader(train, size, train=True, **common),
                          PoseLoader(val, size, train=False, drop_last=False, **common), model, kwargs, size,
                          (len(train.boxes), len(val.boxes)), describe,
                          meta={"category_id": train.category_id, "category": train.category}, result=result,
                          state={"val": val, "sigmas": sigmas})

    def evaluator(self, cfg: PoseConfig, parts: DenseParts, rt: Runtime) -> PoseEvaluator:
        return PoseEvaluator(parts.model.head, parts.state["val"], parts.state["sigmas"], rt)

    def forward(self, cfg: PoseConfig, model: PoseModel):
        return model.flip_test if cfg.pose.flip_test else model

    def epoch_metrics(self, metrics: dict) -> dict:
        return {"ap": metrics["ap"], "ap50": metrics["ap50"], "pck@0.1": metrics["pck"]["0.1"]}

    def write(self, cfg: PoseConfig, parts: DenseParts, preds: dict[int, torch.Tensor], out_dir: Path) -> list[Path]:
        atomic_write_text(json.dumps(coco_results(parts.state["val"], preds)), out_dir / "keypoints.json")
        if not cfg.pose.figure_rows:
            return []
        return [save_pose_figure(parts.val_loader, preds, out_dir / "pose.png", cfg.pose.figure_rows,
                                 cfg.pose.figure_score)]

    def summary(self, cfg: PoseConfig, result: dict) -> str:
        mode = encoder_mode(cfg)
        return (f"pose ({mode} {cfg.init}, {cfg.optim.epochs} epochs): OKS AP {percent(result['ap'])}  AP50 "
                f"{percent(result['ap50'])}  AR {percent(result['ar'])}  PCK@0.1 {percent(result['pck']['0.1'])}")


TASK = PoseTask()


def run_pose(cfg: PoseConfig) -> dict:
    """Train a pose head (and, with --finetune, the encoder); write pose.json, keypoints.json and pose.png."""
    return run_dense(cfg, TASK)


__all__ = ["PoseConfig", "PoseTask", "TASK", "run_pose"]
