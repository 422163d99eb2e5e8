"""`fastmae export`: a trained model (or an encoder) as an ONNX graph for deployment, decoding left outside the graph
(as mmdeploy does), checked against onnxruntime.

    fastmae export --init runs/pose --to onnx --output pose.onnx                  # heatmaps of 32x32 crops
    fastmae export --init runs/pretrain --to onnx --output encoder.onnx --model.img_size 56 56

Writes FILE (one graph, input `images` (B, C, H, W) normalised, a dynamic batch, the size fixed) and FILE's .json:
the task, outputs, size, normalisation, classes and what decoding needs (fastmae/infer/export.py lists the outputs
per task; the README says how to decode pose heatmaps). An existing FILE is not replaced without --overwrite.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from ..config import Rule, image_size, validate
from ..infer.export import check_onnx, export_onnx, metadata, resized
from ..infer.models import read_task_model
from ..weights.checkpoint import atomic_write, atomic_write_text


@dataclass(frozen=True)
class ExportModelConfig:
    """The graph's input size."""

    RULES: ClassVar[dict[str, Rule]] = {"img_size": image_size(zero_ok=True)}

    img_size: tuple[int, int] = (0, 0)
    """Input height and width of the graph (0 0 = the model's own: its training canvas, crop or image size); another
    size resamples the position embeddings (a multiple of the patch size)."""


@dataclass(frozen=True)
class ExportConfig:
    """Export a trained model's network (or an encoder) to ONNX, checked against onnxruntime."""

    init: str = ""
    """The model: a pretrain / finetune / linprobe / segment / detect / pose run or checkpoint, a Hugging Face
    folder (ViTMAE, ViT, VitPose), or any encoder checkpoint `fastmae.load` reads."""
    to: Literal["onnx"] = "onnx"
    """The format."""
    output: str = ""
    """The graph's file (FILE.onnx); its metadata goes to FILE.json."""
    opset: int = 18
    """ONNX opset version."""
    check: bool = True
    """Run the graph in onnxruntime on random inputs and compare with PyTorch (atol 1e-4); --no_check skips it."""
    overwrite: bool = False
    """Replace an existing output file."""
    model: ExportModelConfig = field(default_factory=ExportModelConfig)


def run_export(cfg: ExportConfig) -> dict:
    """Write the ONNX graph and its metadata; return the metadata with the check's largest difference."""
    validate(cfg)
    if not cfg.init:
        raise ValueError("no model: pass --init RUN (a run folder or checkpoint)")
    if not cfg.output:
        raise ValueError("no output file: pass --output FILE.onnx")
    out = Path(cfg.output).expanduser()
    side = out.with_suffix(".json")
    for p in (out, side):
        if p.exists() and not cfg.overwrite:
            raise ValueError(f"{p} exists; pass another --output, or --overwrite to replace it")
        if p.is_dir():
            raise ValueError(f"--output {out}: {p} is a folder; pass a file name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--output {out}: folder {out.parent} does not exist; create it first")
    if cfg.check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ValueError("checking the graph needs onnxruntime (pip install 'fastmae[onnx]'); or pass --no_check "
                             "to export without the check") from None
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ValueError("torch's ONNX exporter needs onnx and onnxscript: pip install 'fastmae[onnx]'") from None
    t0 = time.perf_counter()
    tm = resized(read_task_model(cfg.init), tuple(cfg.model.img_size))
    with tempfile.TemporaryDirectory(prefix=".fastmae-export-", dir=out.parent) as tmp:
        graph = export_onnx(tm, Path(tmp) / "graph.onnx", cfg.opset)
        worst = check_onnx(tm, graph) if cfg.check else None
        atomic_write(out, lambda dst: Path(dst).write_bytes(graph.read_bytes()))
    meta = metadata(tm)
    meta["onnxruntime_max_abs_diff"] = worst
    atomic_write_text(json.dumps(meta, indent=2), side)
    checked = f", onnxruntime within {worst:.2g} of PyTorch" if worst is not None else ""
    print(f"export ({tm.task} {cfg.init}): {out} ({out.stat().st_size / 2**20:.1f} MiB, input images "
          f"(B, {tm.channels}, {tm.size[0]}, {tm.size[1]}), outputs {', '.join(meta['outputs'])}{checked}) and {side} "
          f"in {time.perf_counter() - t0:.1f} s")
    return meta


__all__ = ["ExportConfig", "run_export"]
