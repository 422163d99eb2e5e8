"""Beyond one machine, measured on this one (issue #28).

(S) Shards vs folder: the same photo-like JPEGs (500x375) read as an image folder (`--data.source unlabelled`) and as
    tar shards written from it by `fastmae shard` (`--data.source shards`), RandomResizedCrop to 224, flip,
    normalise, batch 64, one loader worker each (the per-worker rate), rounds interleaved; median images/s of each,
    and the bytes a batch crosses from the worker as float32 and as it would as uint8.
(P) FSDP vs DDP: one training step of the paper's MAE ViT-B/16 (224 px, mask 0.75, AdamW) on 2 gloo processes of
    one thread each, fp32, `--batch` images per process, through fastmae's `parallelize` / DDP wrapping: median
    seconds per step, each rank's peak resident memory (VmHWM: the whole model is built on every rank before
    sharding) and its resident memory after the steps (VmRSS; glibc keeps freed pages, so RSS understates what
    sharding frees), and the bytes of the weights, gradients and AdamW state each rank holds (exact, from the
    tensors: the memory FSDP divides).

    python benchmarks/bench_scale.py                       # both; --only shards | fsdp
    python benchmarks/bench_scale.py --files 512 --rounds 3 --batch 4 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `fastmae` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("shards", "fsdp"), default="")
    p.add_argument("--files", type=int, default=512, help="(S) JPEGs")
    p.add_argument("--rounds", type=int, default=3, help="(S) interleaved passes of each loader")
    p.add_argument("--batch", type=int, default=4, help="(P) images per process")
    p.add_argument("--steps", type=int, default=4, help="(P) timed steps (after one warm-up step)")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--worker", choices=("ddp", "fsdp"), default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shard_rows(files: int, rounds: int) -> dict:
    """(S): median img/s of one worker reading the folder and the shards of the same JPEGs."""
    import torch

    from benchmarks.bench_data import write_photo_jpeg
    from fastmae.cli import main as cli
    from fastmae.config import DataConfig
    from fastmae.data import build_loader

    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    (tmp / "img").mkdir()
    for i in range(files):
        write_photo_jpeg(str(tmp / "img" / f"{i:05d}.jpg"), i)
    assert cli(["shard", "--data.source", "unlabelled", "--data.path", str(tmp / "img"), "--output",
                str(tmp / "sh" / "train-%03d.tar"), "--shard.max_count", "128"]) == 0
    shards = sorted(p.name for p in (tmp / "sh").glob("*.tar"))
    pattern = str(tmp / "sh" / f"train-{{000..{len(shards) - 1:03d}}}.tar")
    loaders = {
        "folder": build_loader(DataConfig(source="unlabelled", path=str(tmp / "img"), num_workers=1), "train",
                               (224, 224), 64, train=True),
        "shards": build_loader(DataConfig(source="shards", path=pattern, num_workers=1), "train", (224, 224), 64,
                               train=True),
    }
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    for r in range(rounds + 1):  # round 0 warms up (worker start, page cache)
        for name, loader in loaders.items():
            loader.set_epoch(r)
            t0, n = time.perf_counter(), 0
            for x, _ in loader:
                n += x.shape[0]
            if r:
                rates[name].append(n / (time.perf_counter() - t0))
    x = next(iter(loaders["folder"]))[0]
    return {"files": files, "shards": len(shards), **{f"{k}_img_s": statistics.median(v) for k, v in rates.items()},
            "batch_bytes_float32": x.numel() * 4, "batch_bytes_uint8": x.numel(),
            "torch_threads": torch.get_num_threads()}


def fsdp_worker(mode: str, batch: int, steps: int) -> None:
    """(P), one rank: build MAE ViT-B/16, wrap for `mode`, time `steps` steps; rank 0 prints a JSON line."""
    import types

    import torch

    from fastmae.models.mae import MaskedAutoencoderViT
    from fastmae.train.dist import cleanup, gather_objects, init_distributed
    from fastmae.train.optim import build_adamw, param_groups_weight_decay
    from fastmae.train.parallel import parallelize, wrap_for_training

    torch.set_num_threads(1)
    info = init_distributed("cpu", 600)
    run = types.SimpleNamespace(parallel=mode, activation_checkpointing=False, compile=False)
    rt = types.SimpleNamespace(run=run, dist=info, device=torch.device("cpu"), precision="fp32")
    torch.manual_seed(info.rank)
    model = MaskedAutoencoderViT(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    opt = build_adamw(param_groups_weight_decay(model, 0.05), 1e-4, (0.9, 0.95), rt.device)
    opt = parallelize(rt, model, opt)
    step_model = wrap_for_training(rt, model)
    x = torch.randn(batch, 3, 224, 224)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = step_model(x, mask_ratio=0.75)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    def local_bytes(t) -> int:  # a DTensor's shard on this rank, or the whole tensor
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state_bytes = sum(local_bytes(p) * 2 for p in model.parameters() if p.requires_grad)  # weights + gradients
    state_bytes += sum(local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    status = Path("/proc/self/status").read_text()
    fields = (line.split(":", 1) for line in status.splitlines())
    kib = {k: int(v.split()[0]) for k, v in fields if k in ("VmHWM", "VmRSS")}
    rows = gather_objects({"rank": info.rank, "step_s": statistics.median(times), "peak_rss": kib["VmHWM"] * 1024,
                           "rss": kib["VmRSS"] * 1024, "state_bytes": state_bytes}, info)
    if info.is_main:
        print(json.dumps({"mode": mode, "batch": batch, "ranks": rows}), flush=True)
    cleanup(wait_for_all=True)


def fsdp_rows(batch: int, steps: int) -> list[dict]:
    """(P): DDP and FSDP runs of the same step, one after the other, each 2 processes under torchrun."""
    out = []
    for mode in ("ddp", "fsdp"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", mode, "--batch", str(batch), "--steps", str(steps)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if res.returncode:
            raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
        out.append(json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1]))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return fsdp_worker(args.worker, args.batch, args.steps)
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"# {cpu} | torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()} | "
          f"{os.cpu_count()} cores")
    result: dict = {}
    if args.only in ("", "shards"):
        s = result["shards"] = shard_rows(args.files, args.rounds)
        print(f"(S) {s['files']} JPEGs 500x375 -> 224, batch 64, one worker: folder {s['folder_img_s']:.0f} img/s, "
              f"shards ({s['shards']} tars) {s['shards_img_s']:.0f} img/s "
              f"({s['shards_img_s'] / s['folder_img_s']:.2f}x)"
              f"; a batch is {s['batch_bytes_float32'] / 2**20:.1f} MiB as float32, "
              f"{s['batch_bytes_uint8'] / 2**20:.1f} MiB as uint8")
    if args.only in ("", "fsdp"):
        rows = result["fsdp"] = fsdp_rows(args.batch, args.steps)
        print("| parallel | images/process | s/step (rank 0, 1) | weights + grads + AdamW state per rank GiB | "
              "peak RSS GiB (rank 0, 1) | RSS after the steps GiB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            ranks = r["ranks"]
            print(f"| {r['mode']} | {r['batch']} | {ranks[0]['step_s']:.2f}, {ranks[1]['step_s']:.2f} | "
              f"{ranks[0]['state_bytes'] / 2**30:.2f}, {ranks[1]['state_bytes'] / 2**30:.2f} | "
                  f"{ranks[0]['peak_rss'] / 2**30:.2f}, {ranks[1]['peak_rss'] / 2**30:.2f} | "
                  f"{ranks[0]['rss'] / 2**30:.2f}, {ranks[1]['rss'] / 2**30:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
