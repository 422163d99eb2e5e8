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
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `fastmae` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

MASK_RATIO = 0.75
IMPLS = ("fastmae", "hf")
COMPILED = "fastmae-compile"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration: model sizes and batch."""

    name: str
    title: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    batch: int
    in_chans: int = 3
    mlp_ratio: float = 4.0
    task: str = "pretrain"
    """'pretrain': MAE train step (masking, decoder, pixel loss); 'finetune': classification ViT on all tokens."""
    num_classes: int = 1000

    def model_kwargs(self) -> dict:
        """Keyword arguments of fastmae's MaskedAutoencoderViT (pretrain) or VisionTransformer (finetune)."""
        kw = dataclasses.asdict(self)
        for k in ("name", "title", "batch", "task", "num_classes"):
            kw.pop(k)
        if self.task == "finetune":
            for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
                kw.pop(k)
            kw.update(num_classes=self.num_classes, global_pool="token")  # cls token + norm, as HF's ViT
        return kw

    def flop_kwargs(self) -> dict:
        """Keyword arguments of mae_forward_flops / vit_forward_flops (heads and pooling do not change the count)."""
        kw = self.model_kwargs()
        for k in ("num_heads", "decoder_num_heads", "global_pool"):
            kw.pop(k, None)
        return kw

    def forward_flops(self) -> dict[str, int]:
        """Matmul FLOPs of one forward pass over the batch, by part, plus 'total'."""
        count = vit_forward_flops if self.task == "finetune" else mae_forward_flops
        return count(**self.flop_kwargs(), batch=self.batch)


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


def mae_forward_flops(
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    decoder_embed_dim: int,
    decoder_depth: int,
    in_chans: int = 3,
    mlp_ratio: float = 4.0,
    mask_ratio: float = MASK_RATIO,
    batch: int = 1,
) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one MAE forward pass, by part, plus their 'total'.

    Counted: the patch-embedding conv on all L patches; per block on N tokens of width d the qkv,
    proj, fc1 and fc2 linears (2*N*d*(4d + 2*hidden)) and attention's QK^T and AV (2 * 2*N*N*d);
    encoder blocks on N = 1+K, decoder_embed on 1+K, decoder blocks and decoder_pred on N = 1+L.
    Not counted: norms, activations, softmax, masking, the loss, the optimizer.
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
    L = (img_size // patch_size) ** 2
    K = int(L * (1 - mask_ratio))  # = fastmae.masking.num_kept, the official count
    P = patch_size**2 * in_chans  # pixels per patch

    parts = {
        "patch_embed": 2 * L * P * embed_dim,
        "encoder": depth * block_flops(1 + K, embed_dim, mlp_ratio),
        "decoder_embed": 2 * (1 + K) * embed_dim * decoder_embed_dim,
        "decoder": decoder_depth * block_flops(1 + L, decoder_embed_dim, mlp_ratio),
        "decoder_pred": 2 * (1 + L) * decoder_embed_dim * P,
    }
    return _per_batch(parts, batch)


def block_flops(n: int, d: int, mlp_ratio: float = 4.0) -> int:
    """One transformer block on n tokens of width d: qkv, proj, fc1, fc2 linears and QK^T, AV."""
    hidden = int(d * mlp_ratio)
    return 2 * n * d * (4 * d + 2 * hidden) + 2 * 2 * n * n * d


def _per_batch(parts: dict[str, int], batch: int) -> dict[str, int]:
    parts = {k: v * batch for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def vit_forward_flops(
    img_size: int, patch_size: int, embed_dim: int, depth: int, in_chans: int = 3, mlp_ratio: float = 4.0,
    num_classes: int = 1000, batch: int = 1,
) -> dict[str, int]:
    """Matmul FLOPs of one classification-ViT forward (fine-tuning): every block on all N = 1+L tokens."""
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
    L = (img_size // patch_size) ** 2
    parts = {
        "patch_embed": 2 * L * patch_size**2 * in_chans * embed_dim,
        "encoder": depth * block_flops(1 + L, embed_dim, mlp_ratio),
        "head": 2 * embed_dim * num_classes,
    }
    return _per_batch(parts, batch)


def mae_train_flops(**kwargs) -> int:
    """Model FLOPs of one training step: 3 x forward (backward = grads of inputs and of weights)."""
    return 3 * mae_forward_flops(**kwargs)["total"]


# ------------------------------------------------------------------------------ implementations


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_fastmae(case: Case) -> torch.nn.Module:
    from fastmae.mae import MaskedAutoencoderViT
    from fastmae.vit import VisionTransformer

    if case.task == "finetune":
        return VisionTransformer(**case.model_kwargs())
    return MaskedAutoencoderViT(**case.model_kwargs(), norm_pix_loss=True)


def build_hf_classifier(case: Case) -> torch.nn.Module:
    """transformers' ViTForImageClassification of the case's size (cls token + LayerNorm + linear head)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=case.img_size, patch_size=case.patch_size, num_channels=case.in_chans,
        hidden_size=case.embed_dim, num_hidden_layers=case.depth, num_attention_heads=case.num_heads,
        intermediate_size=int(case.embed_dim * case.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-6,
        qkv_bias=True, num_labels=case.num_classes, attn_implementation="sdpa",
    )
    model = ViTForImageClassification(cfg)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def build_hf(case: Case) -> torch.nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    if case.task == "finetune":
        return build_hf_classifier(case)

    cfg = ViTMAEConfig(
        image_size=case.img_size,
        patch_size=case.patch_size,
        num_channels=case.in_chans,
        hidden_size=case.embed_dim,
        num_hidden_layers=case.depth,
        num_attention_heads=case.num_heads,
        intermediate_size=int(case.embed_dim * case.mlp_ratio),
        decoder_hidden_size=case.decoder_embed_dim,
        decoder_num_hidden_layers=case.decoder_depth,
        decoder_num_attention_heads=case.decoder_num_heads,
        decoder_intermediate_size=int(case.decoder_embed_dim * case.mlp_ratio),
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        norm_pix_loss=True,
        mask_ratio=MASK_RATIO,
        attn_implementation="sdpa",
    )
    model = ViTMAEForPreTraining(cfg)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def base_impl(impl: str) -> str:
    return "hf" if impl == "hf" else "fastmae"


def build(impl: str, case: Case) -> torch.nn.Module:
    return build_hf(case) if base_impl(impl) == "hf" else build_fastmae(case)


def loss_fn(impl: str, model: torch.nn.Module, case: Case):
    """imgs (B, C, H, W) -> scalar loss, for either implementation (each draws its own mask noise).

    Fine-tuning: cross entropy against fixed seeded labels (B,).
    """
    hf = base_impl(impl) == "hf"
    if case.task == "finetune":
        labels = torch.randint(0, case.num_classes, (case.batch,), generator=torch.Generator().manual_seed(1))
        if hf:
            return lambda imgs: model(pixel_values=imgs, labels=labels.to(imgs.device)).loss
        return lambda imgs: torch.nn.functional.cross_entropy(model(imgs), labels.to(imgs.device))
    if hf:
        return lambda imgs: model(pixel_values=imgs).loss
    return lambda imgs: model(imgs, MASK_RATIO)[0]


def make_images(case: Case, device: torch.device) -> torch.Tensor:
    """The same seeded batch (B, C, H, W) for every implementation and every step."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(case.batch, case.in_chans, case.img_size, case.img_size, generator=g).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One implementation's model, optimizer and fixed input; `step()` is one full train step."""

    def __init__(self, impl: str, case: Case, precision: str, device: torch.device, optim_impl: str):
        torch.manual_seed(0)
        self.impl, self.device = impl, device
        self.model = build(impl, case).to(device).train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        fwd_model = torch.compile(self.model) if impl == COMPILED else self.model
        self.forward = loss_fn(impl, fwd_model, case)
        opt_kw = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optim_impl]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, **opt_kw)
        self.imgs = make_images(case, device)
        if precision == "bf16":
            self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
        elif precision == "fp32":
            self.autocast = contextlib.nullcontext
        else:
            raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16")

    def step(self) -> torch.Tensor:
        with self.autocast():
            loss = self.forward(self.imgs)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def timed(self, n: int) -> tuple[float, float]:
        """Seconds per step over n consecutive steps, and this process's CPU share of the wall time.

        The CPU share (process CPU seconds / (wall seconds x torch threads)) is ~1 on an idle CPU
        machine and drops when other processes take cores: a contention gauge for each round.
        """
        sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall / n, cpu / (wall * torch.get_num_threads())


# ------------------------------------------------------------------------------------ measuring


def peak_matmul_size(device: torch.device) -> int:
    """Side n of the square matmul that measures the peak: 2048 on a CPU, 8192 on a GPU (big enough to fill it)."""
    return 8192 if device.type == "cuda" else 2048


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, n: int = 0, reps: int = 7) -> float:
    """Median TFLOP/s of an n x n x n matmul in `dtype` on random data: the machine's practical matmul peak.

    n = 0 picks `peak_matmul_size`. On a GPU each timing covers 10 products between synchronisations, so
    launch and synchronisation overhead stay out of the figure; the operands are drawn on the device.
    """
    n = n or peak_matmul_size(device)
    inner = 10 if device.type == "cuda" else 1
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return 2 * n**3 / statistics.median(times) / 1e12


def gpu_memory_mark(device: torch.device) -> int:
    """On a GPU: reset the peak-memory counter and return the bytes allocated now; 0 on a CPU."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def free_gpu_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks, so the next case (or a retry at a smaller batch) starts clean."""
    if device.type != "cuda":
        return
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def build_and_warm_up(impl: str, case: Case, precision: str, args, device: torch.device) -> tuple[Runner, dict]:
    """Build one implementation and run its warm-up steps (the compiled one compiles in its first step).

    Returns the runner and its warm-up record: first and last warm-up step times and, on a GPU, the peak
    memory this implementation allocated ('peak_mem_gib'). Runners built earlier sit idle meanwhile, so
    their memory is the constant taken off as `before`.
    """
    before = gpu_memory_mark(device)
    r = Runner(impl, case, precision, device, args.optim_impl)
    sync(device)
    t0 = time.perf_counter()
    loss = r.step()  # for the compiled model this step includes compiling forward and backward
    sync(device)
    first = last = time.perf_counter() - t0
    n_warm = max(args.warmup, 2) + (args.compile_warmup if impl == COMPILED else 0)
    for _ in range(n_warm - 1):
        t0 = time.perf_counter()
        loss = r.step()
        sync(device)
        last = time.perf_counter() - t0
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"{impl} case {case.name} {precision}: loss is {loss.item()}")
    warm = {"first_step_s": first, "last_warmup_step_s": last, "warmup_steps": n_warm}
    if device.type == "cuda":
        warm["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    return r, warm


def bench_case_fitting(case: Case, precision: str, impls: list[str], args, device: torch.device,
                       min_batch: int = 8) -> dict:
    """`bench_case` at the case's batch; after a CUDA out-of-memory error, again at half the batch.

    Rows record the batch that ran ('batch') and the one asked for ('batch_requested').
    """
    batch = case.batch
    while True:
        oom = False
        try:
            res = bench_case(dataclasses.replace(case, batch=batch), precision, impls, args, device)
        except torch.OutOfMemoryError:
            oom = True  # handled below, outside the except block, so the failed runners' frames are freed first
        free_gpu_memory(device)
        if not oom:
            for row in res["rows"]:
                row["batch_requested"] = case.batch
            return res
        if batch // 2 < min_batch:
            raise RuntimeError(f"case {case.name} {precision}: out of memory even at batch {batch}")
        print(f"# case {case.name} {precision}: out of memory at batch {batch}; retrying at batch {batch // 2}",
              flush=True)
        batch //= 2


def bench_case(case: Case, precision: str, impls: list[str], args, device: torch.device) -> dict:
    """Build and warm up every implementation, then time them in interleaved rounds; medians per impl."""
    runners, warm = {}, {}
    for impl in impls:
        runners[impl], warm[impl] = build_and_warm_up(impl, case, precision, args, device)
    steps = args.steps or max(1, round(args.round_seconds / max(w["last_warmup_step_s"] for w in warm.values())))
    # Rounds A, B then B, A, ... until `rounds` of them are clean (every implementation kept
    # its threads busy for >= --min-cpu-share of the wall time, i.e. no other process took a
    # core) or `max_rounds` have run. Statistics use the clean rounds (all rounds if too few).
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    shares: dict[str, list[float]] = {impl: [] for impl in impls}
    clean: list[bool] = []
    waited = 0.0
    while sum(clean) < args.rounds and len(clean) < max(args.max_rounds, args.rounds):
        waited += wait_for_quiet(args.quiet_wait) if device.type == "cpu" else 0.0
        for impl in impls if len(clean) % 2 == 0 else impls[::-1]:
            t, share = runners[impl].timed(steps)
            times[impl].append(t)
            shares[impl].append(share)
        clean.append(device.type != "cpu" or all(shares[i][-1] >= args.min_cpu_share for i in impls))
    use = [k for k, c in enumerate(clean) if c]
    contended = len(use) < args.rounds
    if contended:
        use = list(range(len(clean)))
    train_flops = 3 * case.forward_flops()["total"]
    rows = []
    for impl in impls:
        ts = [times[impl][k] for k in use]
        t = statistics.median(ts)
        row = {
            "case": case.name,
            "precision": precision,
            "impl": impl,
            "batch": case.batch,
            "steps_per_round": steps,
            "rounds_run": len(clean),
            "rounds_clean": sum(clean),
            "rounds_used": use,
            "contended": contended,
            "waited_for_quiet_s": waited,
            "step_s_median": t,
            "step_s_all": times[impl],
            "step_s_best": min(ts),
            "spread": (max(ts) - min(ts)) / t,
            "cpu_share_all": shares[impl],
            "cpu_share": statistics.median(shares[impl]),
            "img_per_s": case.batch / t,
            "train_flops_per_step": train_flops,
            "tflops": train_flops / t / 1e12,
            "params": runners[impl].n_params,
            **warm[impl],
        }
        if "hf" in times:
            row["vs_hf"] = statistics.median(times["hf"][k] / times[impl][k] for k in use)
        rows.append(row)
    del runners
    return {"rows": rows}


def wait_for_quiet(max_wait_s: float, busy_cores: float = 0.3, probe_s: float = 0.5) -> float:
    """Wait (at most max_wait_s) until other processes use < busy_cores cores; return seconds waited.

    Reads /proc/stat twice; this process is idle meanwhile, so any busy time is someone else's.
    """

    def busy_total() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals) - idle, sum(vals)

    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < max_wait_s:
            b0, s0 = busy_total()
            time.sleep(probe_s)
            b1, s1 = busy_total()
            if (b1 - b0) / max(s1 - s0, 1) * (os.cpu_count() or 1) < busy_cores:
                break
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter() - t0


def read_status_kb(field: str) -> int:
    """A field such as VmRSS or VmHWM of /proc/self/status, in kB (-1 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


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


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "cpus": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, gpu_sms=props.multi_processor_count,
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    if hf_available():
        import transformers

        info["transformers"] = transformers.__version__
    return info


def markdown_table(rows: list[dict], peaks: dict[str, float]) -> str:
    """Medians over the clean rounds; 'best' is the fastest of them; 'clean' = clean rounds / rounds run.

    GPU rows add the batch that ran (it may have been halved after running out of memory) and the
    implementation's peak allocated memory.
    """
    gpu = any("peak_mem_gib" in r for r in rows)
    head = "| case | precision | impl | img/s | step ms | best ms | spread | clean | TFLOP/s | % of peak | vs HF |"
    align = "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if gpu:
        head, align = head + " batch | peak GiB |", align + " ---: | ---: |"
    lines = [head, align]
    for r in rows:
        vs = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-"
        line = (
            f"| {r['case']} | {r['precision']} | {r['impl']} | {r['img_per_s']:.1f} | {1e3 * r['step_s_median']:.0f} "
            f"| {1e3 * r['step_s_best']:.0f} | {100 * r['spread']:.0f}% "
            f"| {r['rounds_clean']}/{r['rounds_run']}{' (!)' if r['contended'] else ''} | {r['tflops']:.3f} "
            f"| {100 * r['tflops'] / peaks[r['precision']]:.0f}% | {vs} |"
        )
        if gpu:
            line += f" {r['batch']} | {r.get('peak_mem_gib', float('nan')):.1f} |"
        lines.append(line)
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    """Write the results so far (also after every case, so a run cut short by a time limit keeps its cases)."""
    Path(path).write_text(json.dumps(result, indent=2))


def add_peak_shares(rows: list[dict], peaks: dict[str, float]) -> None:
    """Each row's achieved TFLOP/s as a share of the measured matmul peak of its precision ('mfu')."""
    for r in rows:
        r["mfu"] = r["tflops"] / peaks[r["precision"]]


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
