"""Throughput of one MAE pretraining train step: fastmae against Hugging Face ViTMAE (and of one fine-tuning
step: fastmae's VisionTransformer against transformers' ViTForImageClassification, cases AF and CF).

One step = forward (fp32, or under bf16 autocast) + backward + AdamW step + zero_grad(set_to_none).
All implementations of a (case, precision) live in one process and are timed in interleaved rounds
(A, B, then B, A, ...); each row reports the median over rounds, and "vs HF" is the median over
rounds of the paired ratio t_hf / t_impl, so a shared machine's noise hits every implementation alike.
On a shared CPU machine a round counts only if it is clean: every implementation's threads got the
CPU for >= 90% of the wall time (process CPU time / (wall x threads)); rounds are added until
--rounds clean ones exist (at most --max-rounds), and each round first waits briefly for an idle CPU.

    python benchmarks/bench_model.py                                   # A,T,C x fp32,bf16 x fastmae,hf
    python benchmarks/bench_model.py --cases C --precisions bf16 --compile
    python benchmarks/bench_model.py --cases A --memory                # peak RSS, a fresh process each
    python benchmarks/bench_model.py --selfcheck                       # analytic FLOPs == FlopCounterMode
    python benchmarks/bench_model.py --cases C --precisions bf16 --impls fastmae --profile

Cases: A = ViT-B/16 + 512x8 decoder, 224 px, B 16; T = ViT-Ti/16 + 128x4 decoder, 224 px, B 64;
C = ViT-Ti/4 + 128x4 decoder, 32 px, B 256; F = the Fashion-MNIST default. Mask ratio 0.75, norm_pix_loss on.
Fine-tuning: AF = ViT-B/16, 224 px, B 16, 1000 classes; CF = ViT-Ti/4, 32 px, B 256, 100 classes; cls-token
pooling (as HF's ViTForImageClassification), cross entropy on fixed labels (`vit_forward_flops`: all 1+L tokens).
GPU cases: B / L = ViT-B/16 / ViT-L/16 + 512x8 decoder, 224 px, B 256; BF / LF = their fine-tuning steps, B 256.

On CUDA (`--device cuda`, see benchmarks/gpu_check.sh): every step is timed between synchronisations, the
contention filter is off (CPU share means nothing there), each implementation's peak GPU memory is
torch.cuda.max_memory_allocated over its build and warm-up minus what was allocated before it (its weights,
gradients, AdamW state and activations), a case that runs out of memory is retried at half the batch, and
the matmul peak is an 8192^3 product (10 per timing) on the GPU, measured in the same process.

FLOPs are counted analytically (`mae_forward_flops`: 2 per multiply-add of every linear, conv and
attention matmul; encoder on the 1+K visible tokens, decoder on 1+L tokens; training = 3 x forward)
and shown as achieved TFLOP/s and as a share of this machine's measured square-matmul peak.

Shapes: B batch, C channels, H, W image, p patch, L = (H/p)*(W/p) patches, K = int(L*(1-r)) kept,
D encoder width, Dd decoder width.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `fastmae` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fastmae.bench.cases import (
    COMPILED,
    IMPLS,
    Case,
    Runner,
    base_impl,
    build,
    hf_available,
    loss_fn,
    make_images,
    sync,
)
from fastmae.bench.report import add_peak_shares, machine_info, markdown_table
from fastmae.bench.timing import (
    bench_case_fitting,
    matmul_peak_tflops,
    peak_matmul_size,
    read_status_kb,
)

CASES: dict[str, Case] = {
    "A": Case("A", "ViT-B/16 + 512x8 dec, 224px, B16", 224, 16, 768, 12, 12, 512, 8, 16, batch=16),
    "T": Case("T", "ViT-Ti/16 + 128x4 dec, 224px, B64", 224, 16, 192, 12, 3, 128, 4, 4, batch=64),
    "C": Case("C", "ViT-Ti/4 + 128x4 dec, 32px, B256", 32, 4, 192, 12, 3, 128, 4, 4, batch=256),
    # `fastmae pretrain`'s Fashion-MNIST default (mae_vit_tiny_d6_patch4), grayscale 28px
    "F": Case("F", "ViT-Ti-d6/4 + 128x2 dec, 28px gray, B256", 28, 4, 192, 6, 3, 128, 2, 4, batch=256, in_chans=1),
    # fine-tuning steps: the classification ViT on all 1+L tokens against transformers' ViTForImageClassification
    "AF": Case("AF", "fine-tune ViT-B/16, 224px, B16, 1000 classes", 224, 16, 768, 12, 12, 0, 0, 0, batch=16,
               task="finetune"),
    "CF": Case("CF", "fine-tune ViT-Ti/4, 32px, B256, 100 classes", 32, 4, 192, 12, 3, 0, 0, 0, batch=256,
               task="finetune", num_classes=100),
    # GPU cases (benchmarks/gpu_check.sh): the paper's ViT-B and ViT-L at a GPU-sized batch (halved on OOM)
    "B": Case("B", "ViT-B/16 + 512x8 dec, 224px, B256", 224, 16, 768, 12, 12, 512, 8, 16, batch=256),
    "L": Case("L", "ViT-L/16 + 512x8 dec, 224px, B256", 224, 16, 1024, 24, 16, 512, 8, 16, batch=256),
    "BF": Case("BF", "fine-tune ViT-B/16, 224px, B256, 1000 classes", 224, 16, 768, 12, 12, 0, 0, 0, batch=256,
               task="finetune"),
    "LF": Case("LF", "fine-tune ViT-L/16, 224px, B256, 1000 classes", 224, 16, 1024, 24, 16, 0, 0, 0, batch=256,
               task="finetune"),
}
SELFCHECK_CASE = Case("tiny", "tiny", 32, 4, 64, 2, 4, 32, 2, 4, batch=3)
SELFCHECK_FT_CASE = Case("tiny-ft", "tiny fine-tune", 32, 4, 64, 2, 4, 0, 0, 0, batch=3, task="finetune", num_classes=7)


# ----------------------------------------------------------------------------------------- FLOPs


# ------------------------------------------------------------------------------ implementations


# ------------------------------------------------------------------------------------ measuring


def memory_child(impl: str, case: Case, precision: str, args, device: torch.device) -> dict:
    """Inside a fresh process: build one implementation, run a few steps, report the RSS high-water mark."""
    if base_impl(impl) == "hf":
        import transformers  # noqa: F401  (count the library's import in the baseline, not the model)
    else:
        import fastmae  # noqa: F401
    rss_import = read_status_kb("VmRSS")
    r = Runner(impl, case, precision, device, args.optim_impl)
    rss_built = read_status_kb("VmRSS")
    for _ in range(max(args.warmup, 2)):  # the first step allocates gradients and AdamW state
        r.step()
    import resource

    return {
        "case": case.name,
        "precision": precision,
        "impl": impl,
        "rss_after_import_kb": rss_import,
        "rss_after_build_kb": rss_built,
        "vmhwm_kb": read_status_kb("VmHWM"),
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def run_memory(cases: list[Case], precisions: list[str], impls: list[str], args) -> list[dict]:
    out = []
    for case in cases:
        for precision in precisions:
            for impl in impls:
                cmd = [
                    sys.executable, str(Path(__file__).resolve()), "--memory-child", impl,
                    "--cases", case.name, "--precisions", precision, "--warmup", str(args.warmup),
                    "--threads", str(torch.get_num_threads()), "--optim-impl", args.optim_impl,
                    "--device", args.device,
                ]  # fmt: skip
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"memory child {impl} failed:\n{proc.stderr[-3000:]}")
                out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def profile(case: Case, precision: str, impl: str, args, device: torch.device, rows: int) -> str:
    """torch.profiler top operators by self CPU time over a few steps, after warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    r = Runner(impl, case, precision, device, args.optim_impl)
    for _ in range(max(args.warmup, 2) + (args.compile_warmup if impl == COMPILED else 0)):
        r.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=activities) as prof:
        for _ in range(args.steps or 3):
            r.step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


# ------------------------------------------------------------------------------------ selfcheck


def selfcheck(impls: tuple[str, ...] = IMPLS, verbose: bool = True) -> None:
    """Analytic FLOPs == torch's FlopCounterMode on a tiny model (fastmae, and HF where installed).

    Forward must match exactly. Backward must be 2x forward minus the patch embedding's
    input gradient (the images need none), so training = 3 x forward up to that one term.
    FlopCounterMode has no formula for the CPU flash-attention kernel, so attention runs on the
    math backend here, whose matmuls it counts.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for case in (SELFCHECK_CASE, SELFCHECK_FT_CASE):
        expected = case.forward_flops()
        for impl in (i for i in impls if i != "hf" or hf_available()):
            torch.manual_seed(0)
            model = build(impl, case).train()
            forward = loss_fn(impl, model, case)
            imgs = make_images(case, torch.device("cpu"))
            with sdpa_kernel(SDPBackend.MATH):
                with FlopCounterMode(display=False) as fc:
                    loss = forward(imgs)
                fwd = fc.get_total_flops()
                with FlopCounterMode(display=False) as fc:
                    loss.backward()
                bwd = fc.get_total_flops()
            want_bwd = 2 * expected["total"] - expected["patch_embed"]
            if fwd != expected["total"] or bwd != want_bwd:
                raise AssertionError(
                    f"{impl} {case.task}: FlopCounterMode forward {fwd} / backward {bwd}, "
                    f"analytic {expected['total']} / {want_bwd}"
                )
            if verbose:
                print(f"selfcheck {impl} {case.task}: forward {fwd} FLOPs, backward {bwd} FLOPs == analytic count: ok")


# ----------------------------------------------------------------------------------------- report


def write_json(result: dict, path: str) -> None:
    """Write the results so far (also after every case, so a run cut short by a time limit keeps its cases)."""
    Path(path).write_text(json.dumps(result, indent=2))


def run_speed(cases: list[Case], precisions: list[str], impls: list[str], args, device: torch.device,
              result: dict) -> None:
    """The throughput table: every case x precision timed in interleaved rounds, with the matmul peak."""
    # Contention only ever lowers a measurement, so the peak is the best of several medians,
    # measured at the start and again after every case.
    peak_runs: dict[str, list[float]] = {p: [] for p in precisions}

    def measure_peaks() -> dict[str, float]:
        for p in precisions:
            peak_runs[p].append(matmul_peak_tflops(torch.float32 if p == "fp32" else torch.bfloat16, device))
        return {p: max(v) for p, v in peak_runs.items()}

    peaks = measure_peaks()
    rows: list[dict] = []
    for case in cases:
        step_flops = 3 * case.forward_flops()["total"] / case.batch  # per image
        print(f"# case {case.name}: {case.title}; {step_flops / 1e9:.2f} GFLOP/image per train step", flush=True)
        for precision in precisions:
            rows += bench_case_fitting(case, precision, impls, args, device)["rows"]
            r = rows[-1]
            print(f"#   {precision}: {r['steps_per_round']} steps/round, {r['rounds_clean']} clean of "
                  f"{r['rounds_run']} rounds, waited {r['waited_for_quiet_s']:.0f} s for quiet; params "
                  + ", ".join(f"{x['impl']} {x['params'] / 1e6:.2f}M" for x in rows[-len(impls):]), flush=True)
        peaks = measure_peaks()
        add_peak_shares(rows, peaks)
        result.update(peaks_tflops=peaks, peak_runs_tflops=peak_runs, rows=rows)
        if args.json:
            write_json(result, args.json)
    n = peak_matmul_size(device)
    print(f"# matmul peak ({n}^3, best of the medians of 7 reps, measured before/after each case): "
          + "; ".join(f"{p} {peaks[p]:.3f} TFLOP/s (runs: {', '.join(f'{t:.3f}' for t in v)})"
                      for p, v in peak_runs.items()))
    print()
    print(markdown_table(rows, peaks))
    for r in rows:
        if r["impl"] == COMPILED:
            print(f"\ncompile: case {r['case']} {r['precision']}: first step (compile + run) "
                  f"{r['first_step_s']:.1f} s; steady step {1e3 * r['step_s_median']:.0f} ms")
    result.update(peaks_tflops=peaks, peak_runs_tflops=peak_runs, rows=rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="A,T,C",
                   help="comma list of " + ", ".join(CASES) + " (AF, CF, BF, LF: fine-tuning; B, L, BF, LF: GPU-sized)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    p.add_argument("--impls", default="fastmae,hf", help="comma list of fastmae, hf (hf skipped if not installed)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(fastmae model)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per round (0: about --round-seconds)")
    p.add_argument("--round-seconds", type=float, default=2.0, help="target seconds per round when --steps 0")
    p.add_argument("--rounds", type=int, default=5, help="clean interleaved rounds wanted; medians are over them")
    p.add_argument("--max-rounds", type=int, default=10, help="stop after this many rounds, clean or not")
    p.add_argument(
        "--min-cpu-share", type=float, default=0.9,
        help="a round is clean if each impl's CPU time >= this share of wall x threads (CPU only)",
    )  # fmt: skip
    p.add_argument("--quiet-wait", type=float, default=30.0, help="max seconds to wait for an idle CPU per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per implementation (min 2)")
    p.add_argument("--compile-warmup", type=int, default=3, help="extra warm-up steps for the compiled model")
    p.add_argument("--optim-impl", default="default", choices=("default", "foreach", "fused"), help="AdamW variant")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--memory", action="store_true", help="peak RSS per implementation, a fresh process each")
    p.add_argument("--no-speed", action="store_true", help="skip the throughput table (e.g. with --memory)")
    p.add_argument("--ceiling", action="store_true",
                   help="also replay each step's own matmuls alone: its limit at these shapes (fastmae.bench.ceiling)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top ops for each selection")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--selfcheck", action="store_true", help="check the FLOP count against FlopCounterMode, exit")
    p.add_argument("--json", default="", help="write all results to this JSON file")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_model: --device cuda, but no CUDA device is visible (torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    cases = [CASES[c.strip()] for c in args.cases.split(",") if c.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]

    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, cases[0], precisions[0], args, device)))
        return
    if args.selfcheck:
        selfcheck()
        return

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if "hf" in impls and not hf_available():
        print("transformers is not installed: skipping the hf implementation", file=sys.stderr)
        impls.remove("hf")
    if args.compile:
        impls.insert(impls.index("fastmae") + 1 if "fastmae" in impls else 0, COMPILED)

    info = machine_info(device)
    result: dict = {"machine": info, "args": vars(args)}
    print(f"# bench_model {info['date']}  torch {info['torch']}  {info.get('cpu', '')}  "
          f"flags {','.join(info.get('cpu_flags', []))}  threads {info['threads']}  device {device.type}")
    print("# command: python " + " ".join([sys.argv[0]] + sys.argv[1:]))

    if args.profile:
        for case in cases:
            for precision in precisions:
                for impl in impls:
                    print(f"\n## profile: case {case.name} {precision} {impl}\n")
                    print(profile(case, precision, impl, args, device, args.profile_rows))
        return

    if not args.no_speed:
        run_speed(cases, precisions, impls, args, device, result)

    if args.memory:
        mem = run_memory(cases, precisions, impls, args)
        print("\n| case | precision | impl | peak RSS (VmHWM) MiB | RSS after import MiB | RSS after build MiB |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for m in mem:
            print(f"| {m['case']} | {m['precision']} | {m['impl']} | {m['vmhwm_kb'] / 1024:.0f} "
                  f"| {m['rss_after_import_kb'] / 1024:.0f} | {m['rss_after_build_kb'] / 1024:.0f} |")
        result["memory"] = mem

    if args.json:
        write_json(result, args.json)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
