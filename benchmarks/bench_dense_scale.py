"""Dense tasks at real scale (issue #39): memory and time to the first step of `fastmae pose` and `fastmae detect` on a
COCO-format set of large JPEGs, and training images/s with 0, 1 and 2 loader workers.

The set (`make`): N JPEGs of 1280x960 (smooth backgrounds with a few shapes, quality 90) under DIR/train and 100
under DIR/val, one COCO keypoints file per split (one `person` instance per image: a box and COCO's 17 keypoints),
which `detect` reads as an instances file (its boxes and one category).

A run (`run`): each command once per row, alone, one epoch of a small ViT (the model is not what is measured): the
peak PSS of the whole process tree (the command and its loader workers, sampled every 0.2 s from
/proc/PID/smaps_rollup), the seconds from the start to the end of the first training step (the wall time of step
0's TensorBoard scalar), and the epoch's images/s from log.jsonl. `--tree DIR` runs another checkout's fastmae (the
code before the change) the same way.

    python benchmarks/bench_dense_scale.py make /tmp/coco1500 --images 1500
    python benchmarks/bench_dense_scale.py run /tmp/coco1500 --tree /tmp/before --workers -1   # before: no workers flag
    python benchmarks/bench_dense_scale.py run /tmp/coco1500 --workers 0 1 2

`builtin` times one epoch of each command on its built-in Fashion-MNIST task with its default flags (from random
init), the same way (`--tree` for the code before):

    python benchmarks/bench_dense_scale.py builtin --tree /tmp/before --workers -1
    python benchmarks/bench_dense_scale.py builtin --workers 0 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COCO_KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle"]
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10],
            [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
W, H = 1280, 960


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make", help="write the COCO-format set")
    m.add_argument("root", type=Path)
    m.add_argument("--images", type=int, default=1500)
    r = sub.add_parser("run", help="measure the commands on it")
    r.add_argument("root", type=Path)
    r.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to run")
    r.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="-1: pass no --data.num_workers")
    r.add_argument("--tasks", nargs="+", default=["pose", "detect"])
    r.add_argument("--batch", type=int, default=32)
    b = sub.add_parser("builtin", help="time the commands on their built-in tasks")
    b.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to run")
    b.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="-1: pass no --data.num_workers")
    b.add_argument("--tasks", nargs="+", default=["segment", "detect", "pose"])
    return p.parse_args(argv)


def one_image(args: tuple[Path, int]) -> dict:
    """Image k (a JPEG) and its annotation: a person-sized box with 17 keypoints inside it."""
    path, k = args
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-0.1, 0.1, (3, 2))
    img = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], -1).clip(0, 255)
    pil = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(6):
        x0, y0 = rng.uniform(0, W - 200), rng.uniform(0, H - 200)
        draw.ellipse([x0, y0, x0 + rng.uniform(50, 200), y0 + rng.uniform(50, 200)],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    bw, bh = rng.uniform(150, 400), rng.uniform(300, 700)
    bx, by = rng.uniform(0, W - bw), rng.uniform(0, H - bh)
    draw.rectangle([bx, by, bx + bw, by + bh], outline=(250, 250, 250), width=4)
    pil.save(path, quality=90)
    kp = []
    for _ in COCO_KEYPOINTS:
        kp += [float(bx + rng.uniform(0, bw)), float(by + rng.uniform(0, bh)), 2]
    return {"box": [float(bx), float(by), float(bw), float(bh)], "keypoints": kp}


def make(root: Path, n: int) -> None:
    for split, count in (("train", n), ("val", 100)):
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        jobs = [(d / f"{k:06d}.jpg", k + (0 if split == "train" else 10**6)) for k in range(count)]
        with ProcessPoolExecutor(2) as pool:
            anns = list(pool.map(one_image, jobs, chunksize=16))
        coco = {"images": [{"id": k + 1, "file_name": p.name, "width": W, "height": H} for k, (p, _) in enumerate(jobs)],
                "annotations": [{"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": a["box"], "iscrowd": 0,
                                 "area": a["box"][2] * a["box"][3], "num_keypoints": 17, "keypoints": a["keypoints"]}
                                for k, a in enumerate(anns)],
                "categories": [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINTS, "skeleton": SKELETON}]}
        (root / f"{split}.json").write_text(json.dumps(coco))
        print(f"{count} images under {d}, annotations {root / f'{split}.json'}", flush=True)


def tree_pss_kb(pid: int) -> int:
    """PSS (KiB) of a process and all its descendants, now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def first_step_time(out: Path) -> float | None:
    """The wall time of the first training scalar (step 0's loss) in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = []
    for f in sorted((out / "tensorboard").glob("events.*")):
        for ev in EventFileLoader(str(f)).Load():
            if ev.HasField("summary") and any(v.tag == "train/loss" for v in ev.summary.value) and ev.step == 0:
                times.append(ev.wall_time)
    return min(times) if times else None


def command(task: str, root: Path, out: Path, workers: int, batch: int) -> list[str]:
    section = {"pose": "pose", "detect": "det"}[task]
    args = [sys.executable, "-m", "fastmae.cli", task, "--init", "random", "--model.name", "vit_tiny_patch16",
            "--model.embed_dim", "96", "--model.depth", "2", "--model.num_heads", "3", "--data.source", "coco",
            "--data.path", str(root / "train"), f"--{section}.annotations", str(root / "train.json"),
            "--data.eval_path", str(root / "val"), f"--{section}.eval_annotations", str(root / "val.json"),
            "--optim.epochs", "1", "--optim.batch_size", str(batch), "--run.output_dir", str(out),
            "--run.no_progress", "--run.precision", "fp32"]
    if task == "detect":
        args += ["--model.img_size", "320", "320", "--det.figure_rows", "0"]
    else:
        args += ["--pose.figure_rows", "0"]
    return args + (["--data.num_workers", str(workers)] if workers >= 0 else [])


def builtin_command(task: str, out: Path, workers: int) -> list[str]:
    args = [sys.executable, "-m", "fastmae.cli", task, "--init", "random", "--optim.epochs", "1", "--run.output_dir",
            str(out), "--run.no_progress"]
    return args + (["--data.num_workers", str(workers)] if workers >= 0 else [])


def measure(task: str, root: Path | None, tree: Path, workers: int, batch: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.time()
        args = builtin_command(task, out, workers) if root is None else command(task, root, out, workers, batch)
        proc = subprocess.Popen(args, cwd=tree, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_pss_kb(proc.pid))
            time.sleep(0.2)
        text = proc.stdout.read()
        if proc.returncode != 0:
            raise SystemExit(f"{task} failed:\n{text[-3000:]}")
        first = first_step_time(out)
        epoch = next(e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e.get("epoch") == 1)
        return {"task": task, "workers": workers, "peak_pss_gb": peak / 2**20,
                "first_step_s": None if first is None else first - t0, "images_per_s": epoch["images_per_s"],
                "epoch_s": epoch["epoch_seconds"], "total_s": time.time() - t0}


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.what == "make":
        make(a.root, a.images)
        return
    if a.what == "builtin":
        print(f"built-in tasks, default flags, 1 epoch from random init; fastmae from {a.tree}")
        print("| command | workers | peak PSS (GB) | train img/s | epoch s |\n|---|---|---|---|---|")
        for task in a.tasks:
            for w in a.workers:
                r = measure(task, None, a.tree, w)
                print(f"| {task} | {'(none)' if w < 0 else w} | {r['peak_pss_gb']:.2f} | {r['images_per_s']:.1f} | "
                      f"{r['epoch_s']:.1f} |", flush=True)
        return
    n = len(json.loads((a.root / "train.json").read_text())["images"])
    print(f"{n} training images of {W}x{H} under {a.root}; fastmae from {a.tree}")
    print("| command | workers | peak PSS (GB) | s to first step | train img/s | epoch s |\n|---|---|---|---|---|---|")
    for task in a.tasks:
        for w in a.workers:
            r = measure(task, a.root, a.tree, w, a.batch)
            fs = "-" if r["first_step_s"] is None else f"{r['first_step_s']:.1f}"
            print(f"| {task} | {'(none)' if w < 0 else w} | {r['peak_pss_gb']:.2f} | {fs} | {r['images_per_s']:.1f} | "
                  f"{r['epoch_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
