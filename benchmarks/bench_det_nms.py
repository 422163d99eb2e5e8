"""How much does suppression (per class, or across classes) cost or give? A trained `fastmae detect` run scored again on its own
evaluation split (or held-out scenes) at several `--det.nms_iou` thresholds, nothing retrained: box mAP / AP50 /
AP75 by pycocotools and the mean number of detections per image scoring at least 0.3.

    python benchmarks/bench_det_nms.py --init runs/detect --thresholds 1 0.8 0.7 0.6 0.5 [--class_agnostic]
        [--holdout 1000]

--holdout N: score the N held-out scenes that `fastmae detect --data.holdout N` would use, with the run's own
scene flags (choose a threshold there, not on the evaluation split).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from fastmae.commands.detect import DetDataConfig, DetEvaluator, DetLoader, DetParams, det_splits
from fastmae.infer.models import read_task_model
from fastmae.train.dense import inference
from fastmae.train.dist import DistInfo
from fastmae.train.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="a fastmae detect run folder")
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--holdout", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--class_agnostic", action="store_true", help="suppress across classes too")
    a = p.parse_args()
    run = Path(a.init)
    config = json.loads((run / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(DetParams)}
    det = DetParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["det"].items() if k in fields})
    dfields = {f.name for f in dataclasses.fields(DetDataConfig)}
    data = DetDataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["data"].items()
                            if k in dfields})
    data = dataclasses.replace(data, holdout=a.holdout or data.holdout)
    tm = read_task_model(str(run))
    _, val = det_splits(data, det, tm.channels, config["run"]["seed"])
    loader = DetLoader(val, tm.size, train=False, drop_last=False, channels=tm.channels, mean=tm.mean, std=tm.std,
                       batch_size=32, num_classes=len(tm.classes))
    rt = Runtime(device=torch.device("cpu"), precision=a.precision, precision_label=a.precision, dist=DistInfo(),
                 out_dir=run, logger=None, run=None)
    head = tm.model.head
    head.class_agnostic = a.class_agnostic
    print(f"{run}: {len(val.images)} {'held-out' if data.holdout else 'evaluation'} images, strides {head.strides}, "
          f"{'across classes' if a.class_agnostic else 'per class'}")
    print("| nms_iou | box mAP % | AP50 % | AP75 % | detections >= 0.3 per image |\n|---:|---:|---:|---:|---:|")
    for t in a.thresholds:
        head.nms_iou = t
        dets, m = inference(tm.model, tm.model, loader, DetEvaluator(head, val, rt), rt.device, rt.precision)
        confident = sum(d["score"] >= 0.3 for d in dets) / len(val.images)
        print(f"| {t:g} | {m['map']:.2f} | {m['map50']:.2f} | {m['map75']:.2f} | {confident:.2f} |", flush=True)


if __name__ == "__main__":
    main()
