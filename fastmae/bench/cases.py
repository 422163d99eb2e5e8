"""What is timed: a Case (model sizes, batch, pretrain or fine-tune), the implementations (fastmae eager or
compiled, Hugging Face ViTMAEForPreTraining / ViTForImageClassification) and a Runner doing one full train step
(forward under autocast, backward, AdamW, zero_grad).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from ..train.device import autocast
from .flops import MASK_RATIO, mae_forward_flops, vit_forward_flops

IMPLS = ("fastmae", "hf")


COMPILED = "fastmae-compile"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration: model sizes and batch."""

    name: str
    title: str
    img_size: int | tuple[int, int]  # side, or (H, W)
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
    decoder: str = "self"
    """The MAE's decoder: 'self' (MAE's) or 'cross' (CrossMAE's, decoding kept_mask_ratio x L patches)."""
    kept_mask_ratio: float = 0.0

    def model_kwargs(self) -> dict:
        """Keyword arguments of fastmae's MaskedAutoencoderViT (pretrain) or VisionTransformer (finetune)."""
        kw = dataclasses.asdict(self)
        for k in ("name", "title", "batch", "task", "num_classes"):
            kw.pop(k)
        if self.decoder == "self":  # the default needs no kwargs (older readers of a case take them)
            kw.pop("decoder"), kw.pop("kept_mask_ratio")
        if self.task == "finetune":
            for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder", "kept_mask_ratio"):
                kw.pop(k, None)
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


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_fastmae(case: Case) -> torch.nn.Module:
    from fastmae.models.mae import MaskedAutoencoderViT
    from fastmae.models.vit import VisionTransformer

    if case.task == "finetune":
        return VisionTransformer(**case.model_kwargs())
    return MaskedAutoencoderViT(**case.model_kwargs(), norm_pix_loss=True)


def build_hf_classifier(case: Case) -> torch.nn.Module:
    """transformers' ViTForImageClassification of the case's size (cls token + LayerNorm + linear head)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=case.img_size if isinstance(case.img_size, int) else list(case.img_size), patch_size=case.patch_size, num_channels=case.in_chans,
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
        image_size=case.img_size if isinstance(case.img_size, int) else list(case.img_size),
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
    H, W = (case.img_size, case.img_size) if isinstance(case.img_size, int) else case.img_size
    return torch.randn(case.batch, case.in_chans, H, W, generator=g).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall seconds of `reps` calls of fn, each between device synchronisations."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
        self.autocast = lambda: autocast(device, precision)  # fp16: no scaler, enough for timing

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
