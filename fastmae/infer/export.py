"""A trained model as an ONNX graph of its network only (decoding stays outside, as mmdeploy does), at one input
size with a dynamic batch, checked against onnxruntime; beside it a JSON of what decoding needs.

Graphs per task (input `images` (B, C, H, W) float32, normalised with the JSON's mean / std):
- features (a pretraining run or an encoder): `tokens` (B, 1+L, D), every token after the final norm, cls first;
- classifier: `logits` (B, K);
- segmenter: `logits` (B, K, H, W) (argmax over K gives the label map);
- detector: per level of stride s (the JSON's `strides`), `heat_s` (B, K, H/s, W/s) logits (sigmoid, 3x3
  max-pool peaks) and `box_s` (B, 4, H/s, W/s) distances in pixels: a peak at cell (x, y) is the box from
  ((x + 0.5) s - left, (y + 0.5) s - top) to ((x + 0.5) s + right, (y + 0.5) s + bottom); then the peaks of all
  levels and classes go through one non-maximum suppression at the JSON's `nms_iou` (within each class only
  where `class_agnostic` is false);
- pose: `heatmaps` (B, K, H/r, W/r) of a crop (no flip test): the peak (refined as DARK does) times r is the
  keypoint in crop pixels, its value the keypoint's score.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..models.vit import VisionTransformer
from ..weights.backbone import encoder_kwargs, load_into
from .models import TaskModel

OUTPUTS = {"features": ("tokens",), "classifier": ("logits",), "segmenter": ("logits",), "pose": ("heatmaps",)}


def output_names(tm: TaskModel) -> tuple[str, ...]:
    """The graph's outputs: a detector's `heat_s`, `box_s` per level stride s, else the task's one."""
    if tm.task == "detector":
        strides = tm.model.head.strides
        return tuple(f"heat_{s}" for s in strides) + tuple(f"box_{s}" for s in strides)
    return OUTPUTS[tm.task]


class Graph(nn.Module):
    """The network of a TaskModel with plain tensor outputs (a detector's dict as a tuple)."""

    def __init__(self, tm: TaskModel):
        super().__init__()
        self.task, self.model = tm.task, tm.model

    def forward(self, images: torch.Tensor):
        if self.task == "features":
            return self.model.forward_features(images)
        out = self.model(images)
        if self.task == "detector":
            return (*out["heat"], *out["box"])
        return out


def resized(tm: TaskModel, size: tuple[int, int]) -> TaskModel:
    """A copy of the model taking (H, W) inputs: its encoder rebuilt at that size, position embeddings resampled
    (bicubic), everything else shared as it is. The model's own size: the model itself."""
    if tuple(size) == tuple(tm.size) or not size[0]:
        return tm
    enc = tm.encoder
    p = enc.patch_embed.patch_size[0]
    if size[0] % p or size[1] % p:
        raise ValueError(f"--model.img_size {size[0]} {size[1]} is not a multiple of the patch size {p}")
    if not isinstance(enc, VisionTransformer):  # an MAE: its encoder only (features need nothing else)
        kw = encoder_kwargs(enc)
        new = VisionTransformer(**{**kw, "img_size": tuple(size)}, num_classes=0, global_pool="token")
        sd = {k: v for k, v in enc.state_dict().items() if k in new.state_dict()}
    else:
        kw = {**encoder_kwargs(enc), "img_size": tuple(size)}
        new = VisionTransformer(**kw, num_classes=enc.num_classes, global_pool=enc.global_pool)
        sd = enc.state_dict()
    load_into(new, sd, tuple(enc.patch_embed.grid_size), f"cannot resize {tm.source}")
    out = copy.copy(tm)
    if tm.model is enc:
        out.model = new.eval()
    else:
        model = copy.deepcopy(tm.model)  # a DenseModel or PoseModel: its head kept, the encoder replaced
        model.encoder = new
        out.model = model.eval()
    out.size = tuple(size)
    return out


def metadata(tm: TaskModel) -> dict:
    """What decoding the graph's outputs needs, written beside it as JSON."""
    meta = {"task": tm.task, "input": "images", "outputs": list(output_names(tm)), "img_size": list(tm.size),
            "channels": tm.channels, "mean": list(tm.mean), "std": list(tm.std), "source": tm.source}
    if tm.classes:
        meta["classes"] = tm.classes
    if tm.task == "detector":
        head = tm.model.head
        meta.update(category_ids=tm.category_ids, strides=list(head.strides), nms_iou=float(head.nms_iou),
                    class_agnostic=bool(head.class_agnostic),
                    max_detections=int(head.max_detections))
    if tm.task == "pose":
        m = tm.model
        meta.update(keypoints=list(m.names), skeleton=[list(e) for e in m.skeleton], flip=list(m.flip),
                    heatmap_stride=int(m.head.stride), category_id=int(tm.extra.get("category_id", 1)))
    if tm.task == "segmenter":
        meta["ignore_index"] = int(tm.extra.get("ignore_index", 255))
    return meta


def export_onnx(tm: TaskModel, path: Path, opset: int = 18) -> Path:
    """Write the model's graph to `path` (ONNX, dynamic batch) with torch.onnx's exporter."""
    graph = Graph(tm).eval()
    x = torch.zeros(2, tm.channels, *tm.size)
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")  # it lists the torchvision ops it skips: fastmae uses none
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its progress lines, and
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch.export
            torch.onnx.export(graph, (x,), str(path), dynamo=True, input_names=["images"],
                              output_names=list(output_names(tm)), dynamic_shapes=({0: batch},), opset_version=opset,
                              verbose=False, external_data=False)
    finally:
        quiet.setLevel(level)
    return path


def check_onnx(tm: TaskModel, path: Path, atol: float = 1e-4, batch: int = 3, seed: int = 0) -> float:
    """The largest difference between onnxruntime's outputs and PyTorch's on random inputs (a ValueError above
    atol)."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tm.channels, *tm.size, generator=g)
    with torch.no_grad():
        ref = Graph(tm).eval()(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})
    worst = max(float((torch.from_numpy(o) - r.float()).abs().max()) for o, r in zip(got, ref))
    if worst > atol:
        raise ValueError(f"{path}: onnxruntime's outputs differ from PyTorch's by {worst:.3g} (> {atol}); the export "
                         f"is wrong, please report it")
    return worst


__all__ = ["Graph", "OUTPUTS", "check_onnx", "output_names", "export_onnx", "metadata", "resized"]
