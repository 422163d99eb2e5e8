"""`fastmae.predict(run_or_model, images)`: what `fastmae predict` writes, as Python objects (mmpose's inferencer,
detectron2's DefaultPredictor): one result per image, in order.

Images: a path (one image or a folder, searched recursively), a list of paths, PIL images, numpy arrays (H, W) or
(H, W, C) uint8, or uint8 tensors (C, H, W). In-memory images are written once as lossless PNGs to a temporary
folder and read through the same decode as files, so a picture gives the same result in memory and on disk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.dense import DenseLoader
from ..data.sources import find_images
from ..models.encode import encode
from ..train.dense import inference
from ..train.device import resolve_device, resolve_precision
from . import predictors as P
from .boxes import boxes_from_records, detector_category
from .images import ImageSet, image_set
from .models import TaskModel, read_task_model


def _as_pil(x: Any) -> Image.Image:
    """A PIL image of an array (H, W) / (H, W, C) or a tensor (C, H, W) of uint8."""
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.ndim == 3:
            x = x.permute(1, 2, 0)
        x = x.numpy()
    a = np.asarray(x)
    if a.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (0..255), not {a.dtype}; convert it, e.g. "
                         f"(x * 255).round().astype(np.uint8)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"an image array is (H, W) grey or (H, W, 3|4) colour, not {a.shape}")
    return Image.fromarray(a)


def _files(images: Any, tmp: Path) -> tuple[list[Path], Path]:
    """(files, the folder names are relative to) of the images, in-memory ones written to `tmp` as PNGs."""
    if isinstance(images, (str, Path)):
        p = Path(images).expanduser()
        if p.is_dir():
            found = find_images(p)
            if not found:
                raise ValueError(f"no images found under {p} (searched recursively)")
            return found, p
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; pass an image file, a folder of images or a list of images")
        return [p], p.parent
    single = isinstance(images, Image.Image) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim < 4)
    items = [images] if single else list(images)
    files = []
    for k, x in enumerate(items):
        if isinstance(x, (str, Path)):
            files.append(Path(x).expanduser())
            continue
        f = tmp / f"image_{k:06d}.png"
        _as_pil(x).save(f)
        files.append(f)
    if not files:
        raise ValueError("no images given")
    return files, Path("/")


def _features(tm: TaskModel, images: ImageSet, s: P.Settings) -> list[dict]:
    """The encoder's features of each image (the cls token after the final norm, as `fastmae embed`; no masking),
    the image read through the evaluation crop."""
    loader = DenseLoader(P.ClassifySamples(images, tm), img_size=tm.size, **P.loader_kw(tm, s))

    def per_batch(index: torch.Tensor, feats: torch.Tensor) -> dict:
        return {i: f.float().cpu() for i, f in zip(index.tolist(), feats)}

    out, _ = inference(lambda x: encode(tm.model, x, "token"), tm.model, loader, P.Collect(per_batch), s.device,
                       s.precision)
    return [{"features": out[i]} for i in range(len(images))]


def predict(run_or_model: str | Path | TaskModel, images: Any, *, batch_size: int = 32, device: str = "cpu",
            precision: str = "fp32", boxes: Sequence[Sequence[Sequence[float]]] | None = None,
            detector: str | Path | TaskModel | None = None, category: str = "", score_threshold: float = 0.3,
            flip_test: bool = True, topk: int = 5) -> list:
    """Apply a trained model (a run folder, checkpoint or `read_task_model` result) to images; one result per image.

    - classifier: {'label', 'class_name', 'score', 'topk'};
    - detector: a list of {'category_id', 'class_name', 'bbox' [x, y, w, h], 'score'};
    - pose: a list of {'category_id', 'keypoints' [x, y, score] * K, 'score', 'bbox'} per box: `boxes` (per image a
      list of [x, y, w, h]), else a `detector`'s detections (scoring >= score_threshold, of `category`), else the
      whole image;
    - segmenter: {'mask': (h, w) uint8 class indices};
    - a pretraining run or another encoder: {'features': (D,) float32}, the cls token after the final norm (as
      `fastmae embed`: no masking, deterministic).

    Coordinates are the image's own pixels. Runs in this process (no workers) on `device` at `precision`.
    """
    tm = run_or_model if isinstance(run_or_model, TaskModel) else read_task_model(run_or_model)
    dev = resolve_device(device, "device")
    s = P.Settings(batch_size, 0, dev, resolve_precision(precision, dev, "precision").name)
    tm.model.to(dev)
    with tempfile.TemporaryDirectory(prefix="fastmae-predict-") as tmp:
        files, root = _files(images, Path(tmp))
        imgs = image_set(files, root, tm.channels)
        if tm.task == "classifier":
            return P.classify(tm, imgs, s, topk)
        if tm.task == "detector":
            return P.detect(tm, imgs, s)
        if tm.task == "segmenter":
            masks: dict[int, np.ndarray] = {}
            P.segment(tm, imgs, s, lambda i, m: masks.__setitem__(i, m))
            return [{"mask": masks[i]} for i in range(len(imgs))]
        if tm.task == "pose":
            if boxes is not None:
                if len(boxes) != len(imgs):
                    raise ValueError(f"boxes has {len(boxes)} entries for {len(imgs)} images; give one list per image")
                per = [[([float(v) for v in b], 1.0) for b in bs] for bs in boxes]
            elif detector is not None:
                det = detector if isinstance(detector, TaskModel) else read_task_model(detector)
                if det.task != "detector":
                    raise ValueError(f"detector {det.source} holds a {det.task}, not a `fastmae detect` run")
                det.model.to(dev)
                per = boxes_from_records(P.detect(det, imgs, s), score_threshold,
                                         detector_category(det, category, det.source))
            else:
                per = P.whole_image_boxes(imgs)
            return P.pose(tm, imgs, per, s, flip_test)[0]
        return _features(tm, imgs, s)


__all__ = ["predict"]
