"""`fastmae export --to onnx`: every kind of model as a graph onnxruntime runs with PyTorch's outputs (atol 1e-4),
at the model's size or another, with the metadata decoding needs; refusals in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastmae.cli import main
from fastmae.infer.export import Graph
from fastmae.infer.models import read_task_model
from tests.commands.test_predict import FAST, TINY, write_seg
from tests.helpers.cli import pretrain_tiny
from tests.helpers.coco import write_coco, write_coco_kp

ort = pytest.importorskip("onnxruntime")


def check(run, onnx, size=None) -> dict:
    """The graph in onnxruntime equals the model in PyTorch on a random batch of 3; the metadata."""
    meta = json.loads(onnx.with_suffix(".json").read_text())
    tm = read_task_model(run)
    H, W = size or tm.size
    assert meta["img_size"] == [H, W] and meta["onnxruntime_max_abs_diff"] <= 1e-4
    x = torch.randn(3, tm.channels, H, W, generator=torch.Generator().manual_seed(1))
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})
    if size is None:
        with torch.no_grad():
            ref = Graph(tm).eval()(x)
        for o, r in zip(got, ref if isinstance(ref, tuple) else (ref,)):
            assert np.abs(o - r.numpy()).max() <= 1e-4
    assert [o.name for o in sess.get_outputs()] == meta["outputs"]
    return meta


def test_every_kind_of_model_exports_and_runs_in_onnxruntime(tmp_path, capsys):
    data, pre = pretrain_tiny(tmp_path)
    runs = {"features": pre}
    runs["classifier"] = tmp_path / "ft"
    assert main(["finetune", "--init", str(pre), "--data.path", str(data), "--optim.epochs", "1",
                 "--optim.warmup_epochs", "1", "--optim.batch_size", "32", "--run.output_dir", str(runs["classifier"]),
                 "--run.no_progress", "--run.precision", "fp32"]) == 0
    d, ann = write_coco(tmp_path)
    runs["detector"] = tmp_path / "det"
    assert main(["detect", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d),
                 "--det.annotations", str(ann), "--data.eval_path", str(d), "--det.eval_annotations", str(ann),
                 "--model.img_size", "32", "32", "--run.output_dir", str(runs["detector"]), *FAST]) == 0
    kd, kann = write_coco_kp(tmp_path, name="kp")
    runs["pose"] = tmp_path / "pose"
    assert main(["pose", "--init", str(pre), "--data.source", "coco", "--data.path", str(kd),
                 "--pose.annotations", str(kann), "--data.eval_path", str(kd), "--pose.eval_annotations", str(kann),
                 "--model.img_size", "16", "12", "--data.channels", "1", "--run.output_dir", str(runs["pose"]),
                 *FAST]) == 0
    seg = tmp_path / "s"
    write_seg(seg)
    runs["segmenter"] = tmp_path / "seg"
    assert main(["segment", "--init", "random", *TINY, "--data.source", "folder", "--data.path", str(seg / "images"),
                 "--seg.labels", str(seg / "labels"), "--data.eval_path", str(seg / "images"), "--seg.eval_labels",
                 str(seg / "labels"), "--seg.num_classes", "2", "--run.output_dir", str(runs["segmenter"]),
                 "--data.num_workers", "0", *FAST]) == 0
    capsys.readouterr()
    metas = {}
    for task, run in runs.items():
        onnx = tmp_path / f"{task}.onnx"
        assert main(["export", "--init", str(run), "--output", str(onnx)]) == 0, task
        metas[task] = check(run, onnx)
        assert metas[task]["task"] == task
        assert f"export ({task}" in capsys.readouterr().out
    assert metas["pose"]["keypoints"] == ["left_x", "right_x", "tail"] and metas["pose"]["heatmap_stride"] == 1
    assert metas["detector"]["outputs"] == ["heat_4", "heat_8", "heat_16", "box_4", "box_8", "box_16"]
    assert metas["detector"]["strides"] == [4, 8, 16] and metas["detector"]["nms_iou"] == 0.6
    assert metas["classifier"]["classes"][0] == "T-shirt/top" and metas["features"]["outputs"] == ["tokens"]
    # another input size: positions resampled; the graph still runs and matches (checked by the command)
    assert main(["export", "--init", str(pre), "--output", str(tmp_path / "big.onnx"), "--model.img_size", "56",
                 "56"]) == 0
    check(pre, tmp_path / "big.onnx", size=(56, 56))
    # refusals: an existing file, no output, a size that is no multiple of the patch
    assert main(["export", "--init", str(pre), "--output", str(tmp_path / "big.onnx")]) == 2
    assert "exists; pass another --output, or --overwrite" in capsys.readouterr().err
    assert main(["export", "--init", str(pre)]) == 2
    assert "pass --output FILE.onnx" in capsys.readouterr().err
    assert main(["export", "--init", str(pre), "--output", str(tmp_path / "x.onnx"), "--model.img_size", "30",
                 "30"]) == 2
    assert "not a multiple of the patch size 4" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
