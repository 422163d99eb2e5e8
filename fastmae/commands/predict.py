"""`fastmae predict`: a trained model applied to new images: classes, boxes, keypoints or label maps, written as
COCO-style records (and PNG masks), drawn, and scored when annotations are given.

    fastmae predict --init runs/detect --data.path photos/ --run.output_dir runs/predict-photos

--init: a `fastmae finetune` / `linprobe` / `segment` / `detect` / `pose` run (or checkpoint), or a Hugging Face
VitPose folder. Images: --data.source unlabelled (a folder, recursively, or one image file), folder (class folders:
a classifier is scored on them) or list; any size, read as the task's evaluation reads them (fastmae/infer/
predictors.py). Pose is top-down: its boxes come from a detector run (--predict.detector), a boxes file
(--predict.boxes: COCO annotations or results records with file_name) or, with neither, the whole image.

Outputs in --run.output_dir: predictions.json (a list of records, each with 'file_name', the image's path
relative to --data.path, and the task's fields in the image's own pixels), masks/ (segmentation: one palette PNG
per image, pixel value = class), vis/ (the first --predict.draw images drawn), config.json; with
--predict.annotations (or a labelled source for a classifier) the training command's own result file
(detect.json, pose.json, segment.json, finetune.json / linprobe.json), scored as that command scores.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar, Literal

import numpy as np
import torch

from ..config import NON_NEGATIVE, POSITIVE_INT, Rule, finite, validate
from ..data.coco_json import coco_subset
from ..data.detection import read_coco
from ..data.pose import read_coco_keypoints, sigmas_for
from ..data.segmentation import read_label_map
from ..figures.predictions import draw_detections, draw_label, draw_mask, draw_pose, mask_image
from ..infer import predictors as P
from ..infer.boxes import boxes_from_file, boxes_from_records, detector_category
from ..infer.images import ImageSet, image_set, report_name, source_files
from ..infer.models import TaskModel, read_task_model, require_head
from ..metrics.detection import coco_box_metrics
from ..metrics.pose import coco_keypoint_metrics, pck
from ..metrics.segmentation import confusion_counts, seg_metrics
from ..train.dense import percent
from ..train.dist import print0
from ..train.owner import refuse_foreign
from ..train.results import refuse_replacing
from ..train.trainer import setup, write_config
from ..weights.checkpoint import atomic_write, atomic_write_text

RESULT_OF_TASK = {"detector": "detect.json", "pose": "pose.json", "segmenter": "segment.json"}


# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae predict --help`).


@dataclass(frozen=True)
class PredictDataConfig:
    """The images to predict on."""

    RULES: ClassVar[dict[str, Rule]] = {"num_workers": NON_NEGATIVE, "limit": NON_NEGATIVE,
                                        "max_image_pixels": NON_NEGATIVE}

    source: Literal["unlabelled", "folder", "list"] = "unlabelled"
    """unlabelled: every image under --data.path, recursively (or --data.path is one image file); folder: one
    subfolder per class (a classifier is also scored on them); list: a text file of image paths (optionally
    labelled)."""
    path: str = ""
    """The images: a folder, one image file, or a list file; with --predict.annotations (COCO) the folder its
    file_names are relative to."""
    num_workers: int = 2
    """DataLoader worker processes that decode and place the images (0: in the main process)."""
    limit: int = 0
    """Predict on the first N images only (0 = all)."""
    skip_corrupt: bool = False
    """Leave out (and count) images that cannot be read instead of stopping at the first."""
    max_image_pixels: int = 0
    """Largest image (width x height) decoded (0 = Pillow's limit, 178,956,970 pixels)."""
    apply_exif_orientation: bool = True
    """Turn each image by its EXIF orientation (predictions are in that upright frame); off: the stored pixels (dense
    tasks; a classifier reads images upright, as fine-tuning does)."""


@dataclass(frozen=True)
class PredictParams:
    """What to predict and write."""

    RULES: ClassVar[dict[str, Rule]] = {
        "batch_size": POSITIVE_INT, "topk": POSITIVE_INT, "draw": NON_NEGATIVE,
        "score_threshold": ((lambda v: finite(v) and 0 <= v <= 1), "in [0, 1]"),
    }

    detector: str = ""
    """Pose: a `fastmae detect` run whose detections (scoring at least --predict.score_threshold, of
    --predict.category) are the boxes to estimate keypoints in."""
    boxes: str = ""
    """Pose: a JSON file of boxes: COCO annotations (images matched by file_name) or a list of records with
    'file_name' and 'bbox' [x, y, w, h] (and 'score', 'category_id'), e.g. a detector's predictions.json."""
    category: str = ""
    """Pose with a detector or boxes of several classes: the class (name or COCO id) whose boxes are used."""
    score_threshold: float = 0.3
    """Boxes kept for pose and detections drawn: those scoring at least this."""
    annotations: str = ""
    """Score the predictions as the training command does and write its result file: a COCO instances (detect) or
    keypoints (pose) file naming images under --data.path, or a folder of label PNGs (segment; the label of
    DIR/x.jpg is ANN/x.png). A classifier is scored on the labels of --data.source folder or a labelled list."""
    flip_test: bool = True
    """Pose: average each crop's heatmaps with its mirror image's (as evaluation does)."""
    topk: int = 5
    """Classification: the most probable classes listed per image."""
    draw: int = 16
    """Draw the predictions of the first N images under vis/ (0: none)."""
    batch_size: int = 32
    """Images (pose: boxes) per batch."""
    overwrite: bool = False
    """Replace the outputs of an earlier `fastmae predict` in --run.output_dir (otherwise it stops before any work)."""


@dataclass(frozen=True)
class PredictRunConfig:
    """Where and how it runs."""

    RULES: ClassVar[dict[str, Rule]] = {"num_threads": NON_NEGATIVE}

    output_dir: str = "runs/predict"
    """Folder for predictions.json, masks/, vis/ and the result file."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else the CPU."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    num_threads: int = 0
    """CPU threads for PyTorch (0 = its default)."""
    seed: int = 0
    """Unused by inference itself (no randomness); kept for the shared setup."""
    dist_timeout: float = 1800.0
    """Seconds a collective may wait (predict runs in one process)."""


@dataclass(frozen=True)
class PredictConfig:
    """Apply a trained classifier, segmenter, detector or pose model to images: predictions.json, masks, drawings."""

    init: str = ""
    """The trained model: a finetune / linprobe / segment / detect / pose run folder or checkpoint, or a Hugging
    Face VitPose folder."""
    data: PredictDataConfig = field(default_factory=PredictDataConfig)
    predict: PredictParams = field(default_factory=PredictParams)
    run: PredictRunConfig = field(default_factory=PredictRunConfig)


# ---------------------------------------------------------------------------------------------------
# Checks before any work.


def check_options(cfg: PredictConfig, tm: TaskModel) -> None:
    """One line for a flag the model's task does not take."""
    p = cfg.predict
    if tm.task != "pose":
        for flag, value in (("detector", p.detector), ("boxes", p.boxes)):
            if value:
                raise ValueError(f"--predict.{flag} is for pose models; {cfg.init} is a {tm.task}: leave it out")
    if p.detector and p.boxes:
        raise ValueError("--predict.detector and --predict.boxes both give pose its boxes: pass one")
    if p.category and not (p.detector or p.boxes):
        raise ValueError("--predict.category picks the boxes of a detector or boxes file: pass --predict.detector "
                         "or --predict.boxes with it")
    if p.annotations and tm.task == "classifier":
        raise ValueError("a classifier is scored on the labels of its images: use --data.source folder (class "
                         "folders) or a labelled --data.source list instead of --predict.annotations")
    if not cfg.data.path:
        raise ValueError("no images: pass --data.path (a folder, one image file, or a list file)")


def output_name(name: str, suffix: str = ".png") -> PurePosixPath:
    """Where an image's mask or drawing goes under masks/ or vis/: its reported name with `suffix` (an absolute name,
    an image outside --data.path, keeps its path below the folder)."""
    p = PurePosixPath(name)
    parts = [q for q in p.parts if q not in ("/", "..", ".")]
    return PurePosixPath(*parts).with_suffix(suffix)


def mask_names(names: list[str]) -> list[PurePosixPath]:
    """masks/ and vis/ names: x.jpg -> x.png, or x.jpg.png for every image when two would collide (x.jpg, x.png)."""
    out = [output_name(n) for n in names]
    if len(set(out)) < len(out):
        out = [output_name(n, PurePosixPath(n).suffix + ".png") for n in names]
    return out


# ---------------------------------------------------------------------------------------------------
# The images (and, with --predict.annotations, their ground truth).


def read_images(cfg: PredictConfig, tm: TaskModel) -> tuple[ImageSet, object]:
    """The ImageSet to run on and the ground truth to score against (a DetSplit, PoseSplit, label folder, or None)."""
    d, ann = cfg.data, cfg.predict.annotations
    frame = {"max_image_pixels": d.max_image_pixels, "upright": d.apply_exif_orientation}
    flags = ("--data.path", "--predict.annotations")
    truth = None
    if ann and tm.task in ("detector", "pose"):
        if tm.task == "detector":
            truth = read_coco(d.path, ann, tm.channels, flags, categories=list(zip(tm.category_ids, tm.classes)),
                              **frame)
        else:
            truth = read_coco_keypoints(d.path, ann, tm.channels, flags, **frame)
            if truth.keypoint_names != list(tm.model.names):
                raise ValueError(f"{ann}: keypoints {truth.keypoint_names} differ from the model's "
                                 f"{list(tm.model.names)}; score it on annotations of its own keypoints")
        root = Path(d.path).expanduser()
        store = truth.images
        images = ImageSet(store, [report_name(Path(f), root) for f in store.files])
        if d.limit:
            keep = list(range(min(d.limit, len(images))))
            images = ImageSet(store.subset(keep), images.names[: len(keep)])
        return images, truth
    files, root, labels, classes = source_files(d.source, d.path)
    if d.limit:
        files, labels = files[: d.limit], labels[: d.limit]
    images = image_set(files, root, tm.channels, labels=labels, classes=classes, skip_corrupt=d.skip_corrupt,
                       **frame)
    if ann and tm.task == "segmenter":
        truth = Path(ann).expanduser()
        if not truth.is_dir():
            raise ValueError(f"--predict.annotations {ann} is not a folder; a segmenter is scored on a folder of label "
                             f"PNGs (the label of DIR/x.jpg is ANN/x.png)")
        for name in images.names:
            lbl = truth / PurePosixPath(name).with_suffix(".png")
            if not lbl.is_file():
                raise FileNotFoundError(f"no label map for image {name}: expected {lbl} (same relative path, .png); "
                                        f"add it, or leave --predict.annotations out")
    return images, truth


# ---------------------------------------------------------------------------------------------------
# The run.


def _write_png(pil, path: Path) -> None:
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def pose_boxes(cfg: PredictConfig, images: ImageSet, truth) -> tuple[list | None, TaskModel | None, int | None, str]:
    """Where pose's boxes come from, checked before any work: (each image's boxes, or None when a detector finds
    them; that detector; its category id; a description)."""
    p = cfg.predict
    if p.detector:
        det = require_head(read_task_model(p.detector), p.detector)
        if det.task != "detector":
            raise ValueError(f"--predict.detector {p.detector} holds a {det.task}, not a `fastmae detect` run")
        return None, det, detector_category(det, p.category, p.detector), f"detector {p.detector}"
    if p.boxes:
        return (boxes_from_file(p.boxes, images.names, p.score_threshold, p.category, partial=bool(cfg.data.limit)),
                None, None, f"boxes of {p.boxes}")
    if truth is not None:  # the annotations' boxes, as evaluation crops them
        per: list[list] = [[] for _ in range(len(images))]
        for j, n in enumerate(truth.owner.tolist()):
            if n < len(images):
                per[n].append((truth.boxes[j].tolist(), 1.0))
        return per, None, None, f"the boxes of {cfg.predict.annotations}"
    return P.whole_image_boxes(images), None, None, "whole images"


def image_records(images: ImageSet, preds: list[list[dict]], truth) -> list[dict]:
    """Each image's records flattened, each with its file_name (and, with annotations, their image_id)."""
    return [{"file_name": images.names[i], **({"image_id": truth.image_ids[i]} if truth is not None else {}), **r}
            for i, rs in enumerate(preds) for r in rs]


def run_predict(cfg: PredictConfig) -> dict:
    """Predict on the images; write predictions.json, masks/, vis/ (and a result file when there is ground truth)."""
    validate(cfg)
    if not cfg.init:
        raise ValueError("no model: pass --init RUN (a finetune / linprobe / segment / detect / pose run, or a Hugging "
                         "Face VitPose folder)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("fastmae predict runs in one process (its loader workers read in parallel): start it without "
                         "torchrun, one per device or per part of the images (--data.path)")
    tm = require_head(read_task_model(cfg.init), cfg.init)
    check_options(cfg, tm)
    out = Path(cfg.run.output_dir)
    result_name = RESULT_OF_TASK.get(tm.task, f"{tm.extra.get('command', 'finetune')}.json")
    refuse_foreign(out, "predict")
    if not cfg.predict.overwrite:
        refuse_replacing([out / "predictions.json"], "--predict.overwrite")
    images, truth = read_images(cfg, tm)
    if tm.task == "pose":
        boxes, det, category, boxes_from = pose_boxes(cfg, images, truth)
    rt = setup(cfg.run, cfg, write_config=False)
    tm.model.to(rt.device)
    t0 = time.perf_counter()
    settings = P.Settings(cfg.predict.batch_size, cfg.data.num_workers, rt.device, rt.precision)
    names = mask_names(images.names)
    draw = min(cfg.predict.draw, len(images))
    written: list[str] = []
    result: dict = {}
    records: list[dict] = []

    if tm.task == "classifier":
        preds = P.classify(tm, images, settings, cfg.predict.topk, cfg.data.max_image_pixels)
        records = [{"file_name": n, **r} for n, r in zip(images.names, preds)]
        labels = torch.tensor(images.labels)
        if (labels >= 0).any():
            result = score_classes(tm, images, preds, labels)
        for i in range(draw):
            _write_png(draw_label(images.store.load_for_display(i), preds[i]), out / "vis" / names[i])
    elif tm.task == "detector":
        preds = P.detect(tm, images, settings)
        records = image_records(images, preds, truth)
        if truth is not None:
            gt = coco_subset(truth.coco, truth.image_ids[:len(images)])  # --data.limit: those images' ground truth
            results = [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in records]
            result = {**coco_box_metrics(gt, results), "detections": len(results)}
        for i in range(draw):
            _write_png(draw_detections(images.store.load_for_display(i), preds[i], cfg.predict.score_threshold),
                       out / "vis" / names[i])
    elif tm.task == "pose":
        if det is not None:
            det.model.to(rt.device)
            boxes = boxes_from_records(P.detect(det, images, settings), cfg.predict.score_threshold, category)
        cid = truth.category_id if truth is not None else None
        preds, kps = P.pose(tm, images, boxes, settings, cfg.predict.flip_test, cid)
        records = image_records(images, preds, truth)
        if truth is not None:
            result = score_pose(tm, truth, records, kps, gt_boxes=not (cfg.predict.detector or cfg.predict.boxes),
                                n_images=len(images))
        result["boxes_from"] = boxes_from
        for i in range(draw):
            _write_png(draw_pose(images.store.load_for_display(i), preds[i], tm.model.skeleton, 0.0),
                       out / "vis" / names[i])
    else:  # segmenter
        K, ignore = len(tm.classes), int(tm.extra.get("ignore_index", 255))
        conf = torch.zeros(K * K, dtype=torch.float64)

        def consume(i: int, mask: np.ndarray) -> None:
            nonlocal conf
            _write_png(mask_image(mask, ignore), out / "masks" / names[i])
            records.append({"file_name": images.names[i], "mask": f"masks/{names[i]}",
                            "height": int(mask.shape[0]), "width": int(mask.shape[1])})
            if truth is not None:
                h, w = mask.shape
                label = read_label_map(truth / PurePosixPath(images.names[i]).with_suffix(".png"), (h, w),
                                       images.store.files[i])
                conf += confusion_counts(torch.from_numpy(label).long(), torch.from_numpy(mask).long(), K, ignore)
            if i < draw:
                _write_png(draw_mask(images.store.load_for_display(i), mask, ignore), out / "vis" / names[i])

        P.segment(tm, images, settings, consume)
        order = {n: i for i, n in enumerate(images.names)}
        records.sort(key=lambda r: order[r["file_name"]])
        if truth is not None:
            result = seg_metrics(conf.round().long().view(K, K), tm.classes)
        written.append(str(out / "masks"))

    seconds = time.perf_counter() - t0
    atomic_write_text(json.dumps(records), out / "predictions.json")
    written.insert(0, str(out / "predictions.json"))
    if draw:
        written.append(str(out / "vis"))
    summary = {"init": cfg.init, "task": tm.task, "images": len(images), "skipped": len(images.skipped),
               "records": len(records), "seconds": seconds, "images_per_second": len(images) / max(seconds, 1e-9)}
    write_config(rt)
    scored = bool(result) and (truth is not None or tm.task == "classifier")
    if scored:
        result = {**result, **summary, "annotations": cfg.predict.annotations or cfg.data.path}
        atomic_write_text(json.dumps(result, indent=2, sort_keys=True), out / result_name)
        written.append(str(out / result_name))
    print0(rt.dist, f"predict ({tm.task} {cfg.init}): {len(images)} images"
                    + (f" ({len(images.skipped)} unreadable skipped)" if images.skipped else "")
                    + f", {len(records)} records in {seconds:.1f} s ({summary['images_per_second']:.1f} img/s)"
                    + (f" | {score_line(tm.task, result)}" if scored else "")
                    + f"  ({', '.join(written)})")
    return {**summary, **result}


def score_classes(tm: TaskModel, images: ImageSet, preds: list[dict], labels: torch.Tensor) -> dict:
    """Top-1 / top-5 (%) on the labelled images; class folders are matched to the model's classes by name."""
    labels = labels.clone()
    if images.classes:  # class folders: named after the model's classes ('/' as '_') or by their index
        index = {**{str(k): k for k in range(len(tm.classes))}, **{c.replace("/", "_"): k for k, c in
                                                                   enumerate(tm.classes)}}
        unknown = [c for c in images.classes if c not in index]
        if unknown:
            raise ValueError(f"class folders {unknown[:5]} are not classes of the model ({tm.classes[:10]}); name "
                             f"each folder after its class (a '/' in a name as '_') or by the class index")
        labels = torch.tensor([index[images.classes[y]] if y >= 0 else -1 for y in labels.tolist()])
    valid = labels >= 0
    top = [[t["label"] for t in p["topk"]] for p in preds]
    n = int(valid.sum())
    c1 = sum(int(top[i][0] == int(labels[i])) for i in range(len(preds)) if valid[i])
    c5 = sum(int(int(labels[i]) in top[i][:5]) for i in range(len(preds)) if valid[i])
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def score_pose(tm: TaskModel, truth, records: list[dict], kps: list[torch.Tensor], gt_boxes: bool,
               n_images: int) -> dict:
    """OKS AP (pycocotools, the model's sigmas) of the records; with the annotations' own boxes, the records in
    the annotations' instance order (as evaluation lists them: COCOeval breaks score ties by that order) and PCK."""
    sigmas = list(tm.model.sigmas) or sigmas_for(list(tm.model.names))[0]
    gt = coco_subset(truth.coco, truth.image_ids[:n_images])
    results = [{k: r[k] for k in ("image_id", "category_id", "keypoints", "score")} for r in records]
    if not gt_boxes:
        return {**coco_keypoint_metrics(gt, results, sigmas), "sigmas": sigmas}
    owner = truth.owner.tolist()
    instances = sorted((j for j, n in enumerate(owner) if n < n_images), key=lambda j: owner[j])  # record order
    by_instance = sorted(range(len(instances)), key=lambda f: instances[f])
    metrics = coco_keypoint_metrics(gt, [results[f] for f in by_instance], sigmas)
    p = pck(torch.stack([kps[f][:, :2] for f in by_instance]), truth.keypoints[sorted(instances)],
            truth.boxes[sorted(instances)])
    metrics["pck"] = {k.split("@")[1]: v for k, v in p.items()}
    return {**metrics, "sigmas": sigmas}


def score_line(task: str, result: dict) -> str:
    """The summary's score: the training command's headline metric."""
    if task == "classifier":
        return f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%"
    if task == "detector":
        return f"box mAP {percent(result['map'])}  AP50 {percent(result['map50'])}"
    if task == "pose":
        return f"OKS AP {percent(result['ap'])}  AP50 {percent(result['ap50'])}"
    return f"mIoU {percent(result['miou'])}  pixel accuracy {percent(result['pixel_acc'])}"


__all__ = ["PredictConfig", "run_predict"]
