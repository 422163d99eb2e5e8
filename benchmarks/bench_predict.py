"""`fastmae predict` speed (issue #40): images/s per task, and pose heatmaps + decode against Hugging Face.

`tasks`: one tiny training run per task on the built-in Fashion-MNIST data (1 epoch: the weights are not what is
measured), then `fastmae predict` on N PNGs at each task's own image size (classifier 28x28, segment and detect
scenes, pose 64x64 scenes with the whole image as the box), with 0 and 2 loader workers, nothing drawn. The rate is
`predict`'s own (images / seconds from the model loaded to predictions.json written), the best of --reps.

    python benchmarks/bench_predict.py tasks --images 1024 --precision fp32   # and bf16

`vitpose`: a Hugging Face `VitPoseForPoseEstimation` (ViTPose-B: ViT-B/16 at 256x192, simple decoder, random
weights) and the same model read by `fastmae.load` from its folder, on the same crops and batch (made by
transformers' `VitPoseImageProcessor` from random boxes), interleaved in one process: heatmaps plus the processor's
`post_process_pose_estimation` against fastmae's forward plus its UDP decode (`udp_keypoints` of `dark_decode`, what
`fastmae predict` runs for a VitPose folder). Medians of --reps paired rounds; keypoints compared on the model's
heatmaps and on Gaussian-peaked heatmaps (random weights give flat, noisy maps whose peaks no decoder agrees on).

    python benchmarks/bench_predict.py vitpose --batch 8 --reps 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tasks", help="predict images/s per task")
    t.add_argument("--images", type=int, default=1024)
    t.add_argument("--reps", type=int, default=2)
    t.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--data", default=FMNIST)
    t.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    v = sub.add_parser("vitpose", help="pose heatmaps + decode, fastmae vs transformers")
    v.add_argument("--batch", type=int, default=8)
    v.add_argument("--reps", type=int, default=7)
    v.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    for q in (t, v):
        q.add_argument("--json", default="", help="also write the rows here")
    return p.parse_args(argv)


def cli(args: list[str]) -> dict:
    """Run a fastmae command in this process; its result."""
    from fastmae.cli import COMMANDS, parse

    cfg = parse(args)
    module, name = COMMANDS[args[0]][1].split(":")
    return getattr(__import__(module, fromlist=[name]), name)(cfg)


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    """(N, C, H, W) uint8 -> folder/00000.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        a = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
        Image.fromarray(a).save(folder / f"{i:05d}.png")


def run_tasks(args: argparse.Namespace) -> list[dict]:
    from fastmae.data.detection import fashion_det_scenes
    from fastmae.data.pose import fashion_pose_scenes
    from fastmae.data.segmentation import fashion_scenes
    from fastmae.data.sources import load_fashion_mnist

    n = args.images
    common = ["--run.no_progress", "--optim.epochs", "1", "--run.precision", "fp32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        items, _ = load_fashion_mnist(args.data, "eval")
        scenes = {"segmenter": fashion_scenes(args.data, "eval", n, 84, (2, 4), 0).images,  # the default sizes
                  "detector": fashion_det_scenes(args.data, "eval", n, 84, (2, 4), 0).images,
                  "pose": fashion_pose_scenes(args.data, "eval", n, 64, 2, 0).images}
        sets = {"classifier": items[:n], **{k: torch.stack([v[i] for i in range(n)]) for k, v in scenes.items()}}
        train = {
            "classifier": ["finetune", "--init", "random", "--data.limit", "512", "--model.img_size", "28", "28"],
            "segmenter": ["segment", "--init", "random", "--seg.train_scenes", "128", "--seg.eval_scenes", "16"],
            "detector": ["detect", "--init", "random", "--det.train_scenes", "128", "--det.eval_scenes", "16"],
            "pose": ["pose", "--init", "random", "--pose.train_images", "128", "--pose.eval_images", "16"],
        }
        for task, images in sets.items():
            run = root / f"run-{task}"
            cli(train[task] + ["--data.path", args.data, "--run.output_dir", str(run), *common])
            folder = root / f"images-{task}"
            write_pngs(images, folder)
            for workers in args.workers:
                best = 0.0
                for r in range(args.reps):
                    out = root / f"pred-{task}-{workers}-{r}"
                    res = cli(["predict", "--init", str(run), "--data.path", str(folder), "--run.output_dir", str(out),
                               "--data.num_workers", str(workers), "--predict.batch_size", str(args.batch),
                               "--predict.draw", "0", "--run.precision", args.precision])
                    best = max(best, res["images_per_second"])
                rows.append({"task": task, "images": n, "size": list(images.shape[-2:]), "workers": workers,
                             "precision": args.precision, "images_per_second": best})
                print(f"{task:10s} {n} images of {images.shape[-2]}x{images.shape[-1]}, workers {workers}, "
                      f"{args.precision}: {best:.0f} img/s", flush=True)
    return rows


def run_vitpose(args: argparse.Namespace) -> dict:
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation
    from transformers.models.vitpose.image_processing_pil_vitpose import VitPoseImageProcessorPil

    import fastmae
    from fastmae.data.pose import box_centre_scale, udp_crop_matrix, udp_keypoints
    from fastmae.infer.predictors import HF_DARK_SIGMA
    from fastmae.models.pose import DARK_KERNEL, dark_decode, encode_heatmaps

    torch.manual_seed(0)
    bb = VitPoseBackboneConfig(out_indices=[12])  # ViT-B/16 at 256x192
    hf = VitPoseForPoseEstimation(VitPoseConfig(backbone_config=bb, use_simple_decoder=True)).eval()
    proc = VitPoseImageProcessorPil()
    H, W = proc.size["height"], proc.size["width"]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    boxes = [[float(rng.uniform(0, 300)), float(rng.uniform(0, 200)), float(rng.uniform(60, 300)),
              float(rng.uniform(100, 260))] for _ in range(args.batch)]
    pixels = proc(images=image, boxes=[boxes], return_tensors="pt")["pixel_values"]  # (B, 3, 256, 192)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = fastmae.load(tmp).eval()
    matrices = torch.stack([udp_crop_matrix(*box_centre_scale(b, W / H), (H, W)) for b in boxes])
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def run_hf():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = hf(pixel_values=pixels)
        out.heatmaps = out.heatmaps.float()
        res = proc.post_process_pose_estimation(out, boxes=[boxes])
        return torch.stack([r["keypoints"] for r in res[0]]).numpy(), out.heatmaps

    def run_ours():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            heat = ours(pixels)
        xy, _ = dark_decode(heat.float(), DARK_KERNEL, sigma=HF_DARK_SIGMA, keep_max=False, bounded=False)
        return udp_keypoints(xy, matrices, (H, W), tuple(heat.shape[-2:])).numpy(), heat.float()

    run_hf(), run_ours()  # warm up
    times: dict[str, list[float]] = {"transformers": [], "fastmae": []}
    for _ in range(args.reps):
        for name, fn in (("transformers", run_hf), ("fastmae", run_ours)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    kp_hf, heat_hf = run_hf()
    kp_ours, heat_ours = run_ours()
    # decode alone, on the model's heatmaps and on peaked ones (Gaussians of sigma 2 at random sub-pixel places)
    Hh, Wh = heat_hf.shape[-2:]
    truth = torch.rand(args.batch, heat_hf.shape[1], 2, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [Wh - 12.0, Hh - 12.0]) + 6
    peaked, _ = encode_heatmaps(truth, torch.ones(truth.shape[:2]), (Hh, Wh), 2.0)
    cs = [proc_cs(b, W, H) for b in boxes]
    centers, scales = np.stack([c for c, _ in cs]), np.stack([s for _, s in cs])
    t = time.perf_counter()
    ref, _ = proc.keypoints_from_heatmaps(peaked.numpy(), centers, scales, kernel=DARK_KERNEL)
    t_dec_hf = time.perf_counter() - t
    t = time.perf_counter()
    xy, _ = dark_decode(peaked, DARK_KERNEL, sigma=HF_DARK_SIGMA, keep_max=False, bounded=False)
    got = udp_keypoints(xy, matrices, (H, W), (Hh, Wh)).numpy()
    t_dec_ours = time.perf_counter() - t
    diff_model = np.abs(kp_ours - kp_hf).max(-1)  # (B, K) largest of |dx|, |dy|
    row = {
        "batch": args.batch, "precision": args.precision, "crop": [H, W], "heatmap": [Hh, Wh],
        "ms_transformers": 1000 * statistics.median(times["transformers"]),
        "ms_fastmae": 1000 * statistics.median(times["fastmae"]),
        "speedup": statistics.median(a / b for a, b in zip(times["transformers"], times["fastmae"])),
        "heatmaps_max_abs_diff": float((heat_hf - heat_ours).abs().max()),
        "keypoints_peaked_max_px": float(np.abs(got - ref).max()),
        "keypoints_model_within_0.1px": float((diff_model <= 0.1).mean()),
        "keypoints_model_max_px": float(diff_model.max()),
        "decode_ms_transformers": 1000 * t_dec_hf, "decode_ms_fastmae": 1000 * t_dec_ours,
    }
    print(json.dumps(row, indent=2))
    return row


def proc_cs(box, W, H):
    from transformers.models.vitpose.image_processing_pil_vitpose import box_to_center_and_scale

    return box_to_center_and_scale(box, W, H)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from fastmae.bench.report import machine_info

    torch.manual_seed(0)
    info = machine_info(torch.device("cpu"))
    print(json.dumps(info))
    rows = run_tasks(args) if args.what == "tasks" else [run_vitpose(args)]
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
