"""`fastmae detect`: COCO parsing, box transforms, the CenterNet decode, pycocotools scoring, and the command end to end
(CLI, resume, outputs in COCO format, held-out scoring, bad inputs)."""

from __future__ import annotations

import json

import pytest
import torch

import fastmae
from fastmae.cli import main
from fastmae.data.detection import (
    DetLoader,
    fashion_det_scenes,
)
from fastmae.models.detection import (
    CenterNetHead,
)
from tests.helpers.cli import make_fmnist, pretrain_tiny
from tests.helpers.coco import write_coco

TINY = ["--model.name", "vit_tiny_patch4", "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2"]



FAST = ["--optim.epochs", "1", "--optim.batch_size", "8", "--run.no_progress", "--run.precision", "fp32",
        "--det.channels", "16"]



def scene_args(data, out, train: int = 24, eval_: int = 8, size: int = 32) -> list[str]:
    return ["detect", "--data.path", str(data), "--run.output_dir", str(out), "--det.train_scenes", str(train),
            "--det.eval_scenes", str(eval_), "--det.scene_size", str(size), "--det.figure_rows", "2", *FAST]



def test_detect_end_to_end_on_scenes_resumes_and_loads(tmp_path):
    data, run = pretrain_tiny(tmp_path)
    out = tmp_path / "det"
    assert main(scene_args(data, out) + ["--init", str(run), "--det.eval_every", "1"]) == 0
    res = json.loads((out / "detect.json").read_text())
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert logged[-1]["map"] == pytest.approx(res["map"]) and (out / "learning_curve.png").exists()
    assert {"map", "map50", "map75", "map_small", "map_medium", "map_large", "per_class_ap"} <= set(res)
    assert set(res["per_class_ap"]) == {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                        "Sneaker", "Bag", "Ankle boot"}
    dets = json.loads((out / "detections.json").read_text())
    assert dets and set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    assert all(0 <= d["bbox"][0] and d["bbox"][0] + d["bbox"][2] <= 32 + 1e-4 for d in dets)  # the image's pixels
    assert (out / "detections.png").exists()
    enc = fastmae.load(out)  # a detect run is an encoder for the other commands
    assert type(enc).__name__ == "VisionTransformer" and tuple(enc.patch_embed.img_size) == (32, 32)
    first = (out / "log.jsonl").read_text()
    assert main(scene_args(data, out) + ["--init", str(run), "--optim.epochs", "2"]) == 0  # resumes for epoch 2
    lines = (out / "log.jsonl").read_text()
    assert lines.startswith(first) and lines.count('"epoch"') >= 2



def test_detect_on_coco_files_of_any_size(tmp_path):
    d, ann = write_coco(tmp_path)
    ed, eann = write_coco(tmp_path, sizes=((36, 28), (20, 40)), name="val")
    out = tmp_path / "run"
    args = ["detect", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d), "--det.annotations",
            str(ann), "--data.eval_path", str(ed), "--det.eval_annotations", str(eann), "--model.img_size", "32",
            "32", "--run.output_dir", str(out), *FAST, "--optim.batch_size", "2"]  # 3 training images
    assert main(args) == 0
    dets = json.loads((out / "detections.json").read_text())
    assert {r["image_id"] for r in dets} <= {100, 107} and {r["category_id"] for r in dets} <= {7, 42}
    res = json.loads((out / "detect.json").read_text())
    assert set(res["per_class_ap"]) == {"dog", "cat"}



def test_detect_bad_input_is_one_line(tmp_path, capsys):
    d, ann = write_coco(tmp_path)
    base = ["detect", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d),
            "--run.output_dir", str(tmp_path / "o"), *FAST]
    assert main(base) == 2
    assert "needs --det.annotations FILE" in capsys.readouterr().err
    assert main(base + ["--det.annotations", str(ann)]) == 2
    assert "no evaluation data: pass --data.eval_path DIR" in capsys.readouterr().err
    data = make_fmnist(tmp_path)
    assert main(scene_args(data, tmp_path / "p", size=30) + ["--init", "random", *TINY]) == 2
    assert "not a multiple of the encoder's patch size 4" in capsys.readouterr().err



@pytest.mark.slow
def test_detect_under_two_process_ddp_scores_each_image_once(tmp_path):
    """torchrun --nproc_per_node 2: one set of outputs, every evaluation image's detections exactly once (the shards
    of 7 images are padded to 8), ids and classes as in one process."""
    import os
    import subprocess
    import sys

    data = make_fmnist(tmp_path)
    out = tmp_path / "ddp"
    args = scene_args(data, out, train=16, eval_=7) + ["--init", "random", *TINY, "--run.num_threads", "1",
                                                       "--det.max_detections", "5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastmae", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "x2" in res.stdout
    dets = json.loads((out / "detections.json").read_text())
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert set(per_image) <= set(range(1, 8)) and max(per_image.values(), default=0) <= 5  # at most k per image
    assert len(list(out.glob("checkpoint-*.pt"))) == 1 and (out / "detect.json").exists()



def test_repeated_images_of_padded_shards_are_scored_once(tmp_path, monkeypatch):
    """Every rank's part comes back from the gather; an image two ranks both saw counts once."""
    from fastmae.commands import detect
    from fastmae.models.dense import DenseModel
    from fastmae.models.vit import VisionTransformer
    from fastmae.train.dense import inference
    from fastmae.train.dist import DistInfo
    from fastmae.train.runtime import Runtime

    data = make_fmnist(tmp_path)
    split = fashion_det_scenes(str(data), "eval", 5, 32, (1, 2), 0)
    loader = DetLoader(split, (32, 32), train=False, drop_last=False, channels=1, mean=(0.5,), std=(0.5,),
                       batch_size=2, num_classes=10)
    enc = VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                            global_pool="token")
    model = DenseModel(enc, CenterNetHead(16, 10, 4, channels=8, max_detections=3))
    torch.nn.init.constant_(model.head.box[-1].bias, 2.0)  # boxes of 2 x e^2 x 8 px: none dropped as degenerate
    rt = Runtime(device=torch.device("cpu"), precision="fp32", precision_label="fp32", dist=DistInfo(), out_dir=tmp_path,
                 logger=None, run=None)
    monkeypatch.setattr(detect, "gather_objects", lambda obj, info: [obj, {k: v for k, v in obj.items() if k < 2}])
    dets, _ = inference(model, model, loader, detect.DetEvaluator(model.head, split, rt), rt.device, rt.precision)
    assert len(dets) == 5 * 3 and len({(d["image_id"], tuple(d["bbox"]), d["score"]) for d in dets}) == 15



def test_holdout_scores_training_images_never_trained_on(tmp_path, capsys):
    from fastmae.commands.detect import DetDataConfig, DetParams, det_splits

    d, ann = write_coco(tmp_path, sizes=((24, 32), (32, 24), (30, 30), (16, 40)))
    train, val = det_splits(DetDataConfig(source="coco", path=str(d), holdout=2), DetParams(annotations=str(ann)), 3, 0)
    assert len(val.images) == 2 and len(train.images) == 2 and not set(val.image_ids) & set(train.image_ids)
    assert {im["id"] for im in val.coco["images"]} == set(val.image_ids)  # scored on its own ground truth only
    data = make_fmnist(tmp_path)
    train, val = det_splits(DetDataConfig(path=str(data), holdout=5), DetParams(train_scenes=6), 1, 0)
    assert len(val.images) == 5 and val.names[0] == "holdout scene 0" and len(train.images) == 6
    base = ["detect", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d), "--det.annotations",
            str(ann), "--run.output_dir", str(tmp_path / "o"), *FAST]
    assert main(base + ["--data.holdout", "2", "--det.eval_annotations", str(ann)]) == 2
    assert "--data.holdout takes the evaluation images from the training annotations" in capsys.readouterr().err
    assert main(base + ["--data.holdout", "2", "--det.strides", "4", "3", "--model.img_size", "32", "32"]) == 2
    assert "each stride must be the patch size 4 times a power of two" in capsys.readouterr().err
    assert not (tmp_path / "o" / "detect.json").exists()


def test_the_generated_shapes_set_is_coco_with_objects_for_every_level(tmp_path):
    import numpy as np

    from benchmarks.make_shapes_coco import write_split
    from fastmae.data.detection import read_coco
    from fastmae.models.detection import level_of

    path = write_split(tmp_path, "val", 40, np.random.default_rng(0))
    split = read_coco(str(tmp_path / "val"), str(path), 1, ("--data.path", "--det.annotations"))
    assert len(split.images) == 40 and split.classes == ["square", "disc", "triangle"]
    boxes = torch.cat(split.boxes)
    assert set(level_of(boxes, (2, 4, 8)).tolist()) == {0, 1, 2}  # small, middle and large objects
    again = write_split(tmp_path / "again", "val", 40, np.random.default_rng(0))
    assert again.read_text() == path.read_text()  # the same seed, the same set
