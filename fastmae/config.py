"""Typed, frozen configuration per command; field docstrings become `fastmae CMD --help`.

Nested sections turn into `--section.field` flags (tyro). Presets are plain functions below.
The resolved config is written as JSON next to the checkpoints (`config.json`). `validate` checks
the ranges of every field before a command starts work, naming the flag as the user types it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------------------------------------
# Range checks: each config class lists its fields' rules (RULES), so a bad flag fails before any work starts.

Rule = tuple[Callable[[Any], bool], str]  # (value is fine, what the value must be)


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo: float, note: str = "") -> Rule:
    return (lambda v: finite(v) and v >= lo), f">= {lo}{note}"


def above(lo: float) -> Rule:
    return (lambda v: finite(v) and v > lo), f"> {lo}"


def within(lo: float, hi: float, open_hi: bool = False) -> Rule:
    return (lambda v: finite(v) and lo <= v and (v < hi if open_hi else v <= hi)), (
        f"in [{lo}, {hi}{')' if open_hi else ']'}")


def each(rule: Rule) -> Rule:
    ok, text = rule
    return (lambda v: all(ok(x) for x in v)), f"all {text}"


def image_size(zero_ok: bool) -> Rule:
    def ok(v: Any) -> bool:
        return len(v) == 2 and (all(finite(x) and x >= 1 for x in v) or (zero_ok and tuple(v) == (0, 0)))

    return ok, "two positive integers H W" + (" (or 0 0 for the checkpoint's)" if zero_ok else "")


NON_NEGATIVE = at_least(0)
POSITIVE_INT = at_least(1)
FRACTION = within(0, 1, open_hi=True)


@dataclass(frozen=True)
class SourceConfig:
    """Where images come from and how they are normalised: the data flags every command shares."""

    RULES: ClassVar[dict[str, Rule]] = {"channels": at_least(0, " (0 = the source's own)"), "limit": NON_NEGATIVE,
                   "mean": each((finite, "finite")), "std": each(above(0)),
                   "max_image_pixels": at_least(0, " (0 = Pillow's limit)")}

    source: Literal["fashion-mnist", "folder", "unlabelled", "list", "shards"] = "fashion-mnist"
    """fashion-mnist: IDX .gz files; folder: one subfolder per class (ImageNet layout);
    unlabelled: every image under `path`, recursively; list: a text file of image paths
    (one per line, optionally followed by an integer label; relative paths are relative to the list file's folder);
    shards: tar shards in webdataset layout (KEY.jpg|png|webp|tif..., optional KEY.cls label), streamed."""
    path: str = FASHION_MNIST_DIR
    """Training data: the IDX folder, the image folder, the list file, or the shards: a brace pattern
    ('DIR/train-{000000..000099}.tar'), a text file listing shard paths or URLs, or 'pipe:CMD' URLs."""
    eval_path: str = ""
    """Evaluation split for folder/list/shards sources (Fashion-MNIST uses its t10k files)."""
    channels: int = 0
    """Channels fed to the model; images are converted (0 = the source's own: 1 for Fashion-MNIST, else 3)."""
    mean: tuple[float, ...] = ()
    """Per-channel normalisation mean (empty = the source's default: Fashion-MNIST's own, ImageNet's for RGB)."""
    std: tuple[float, ...] = ()
    """Per-channel normalisation std (empty = the source's default)."""
    hflip: bool = True
    """Random horizontal flip in training."""
    limit: int = 0
    """Use only the first N samples of each split (0 = all): for quick runs."""
    max_image_pixels: int = 0
    """Largest image (width x height) decoded; bigger files are refused as possible decompression bombs
    (0 = Pillow's limit, 178,956,970 pixels)."""


@dataclass(frozen=True)
class AnnotatedSourceConfig(SourceConfig):
    """Images with annotations in their pixels (label maps, boxes, keypoints): the frame those are in, and the
    workers that read them."""

    RULES: ClassVar[dict[str, Rule]] = {"num_workers": NON_NEGATIVE}

    path: str = FASHION_MNIST_DIR
    """Training images: the Fashion-MNIST IDX folder (the built-in scenes), or the folder the annotations name
    their images in (--data.source coco: each image's file_name is relative to it; folder: the images)."""
    eval_path: str = ""
    """Evaluation images, as --data.path (the built-in scenes use the t10k files of --data.path)."""
    num_workers: int = 2
    """DataLoader worker processes that decode, place (letterbox, crop) and augment image files (0: in the main
    process); files are read when a batch needs them, never all held in memory. The generated built-in scenes are
    in memory and need none."""
    apply_exif_orientation: bool = True
    """Turn each image by its EXIF orientation (as viewers, labelme, CVAT and detectron2 show it) and take its
    annotations in that upright frame; --data.no_apply_exif_orientation: the stored pixels, for annotations
    made on them."""


@dataclass(frozen=True)
class DataConfig(SourceConfig):
    """Where images come from and how they become tensors."""

    RULES: ClassVar[dict[str, Rule]] = {
        "num_workers": NON_NEGATIVE, "shuffle_buffer": NON_NEGATIVE,
        "holdout": at_least(0, " (0 = the source's own evaluation split)"),
        "crop_scale": ((lambda v: len(v) == 2 and all(map(finite, v)) and 0 < v[0] <= v[1] <= 1),
                       "(min, max) with 0 < min <= max <= 1"),
    }

    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range as a fraction of the image (the paper: 0.2-1.0)."""
    num_workers: int = 2
    """DataLoader worker processes for file-based sources (in-memory sources need none)."""
    skip_corrupt: bool = False
    """Skip unreadable/corrupt image files (counted and listed in the log) instead of stopping; in shards, an
    unreadable sample is replaced by another image of its batch."""
    shuffle_buffer: int = 1000
    """Shards: samples each loader worker holds to shuffle its stream (training; replayed exactly on resume)."""
    holdout: int = 0
    """Hold out N training samples (a fixed random choice, the same in every run) as the evaluation split instead
    of the test / --data.eval_path one: tune on them, then report on the test split with 0 (the default)."""


@dataclass(frozen=True)
class MAEModelConfig:
    """The masked autoencoder; 0 means 'the variant's value'."""

    RULES: ClassVar[dict[str, Rule]] = {
        "img_size": image_size(zero_ok=False),
        "mask_ratio": ((lambda v: finite(v) and 0 < v < 1), "in (0, 1) (0 masks nothing, so nothing is learned)"),
        "kept_mask_ratio": ((lambda v: finite(v) and 0 <= v < 1), "in [0, 1) (0 = every masked patch)"),
        **dict.fromkeys(("in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                         "decoder_num_heads"), at_least(0, " (0 = the variant's)")),
    }

    name: str = "mae_vit_tiny_d6_patch4"
    """Variant: mae_vit_{tiny,small,base,large,huge}_patch{2,4,8,14,16} (e.g. mae_vit_base_patch16, the paper's
    ViT-B/16), or mae_vit_tiny_d6_patch4, the small-data default (fastmae.models.mae.MAE_VARIANTS)."""
    img_size: tuple[int, int] = (28, 28)
    """Input height and width (multiples of the patch size)."""
    in_chans: int = 0
    """Input channels (0 = from the data)."""
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    decoder_embed_dim: int = 0
    decoder_depth: int = 0
    decoder_num_heads: int = 0
    norm_pix_loss: bool = False
    """Regress per-patch normalised pixels (the paper's target; BENCHMARKS.md compares both on small data)."""
    mask_ratio: float = 0.75
    """Fraction of patches removed."""
    decoder: Literal["self", "cross"] = "self"
    """self: MAE's decoder (mask tokens among the visible tokens, full self-attention, every masked patch decoded);
    cross: CrossMAE's (a query per decoded patch, mask token + position, cross-attending to the encoder's tokens;
    decodes --model.kept_mask_ratio of the patches). The encoder is the same."""
    kept_mask_ratio: float = 0.0
    """With --model.decoder cross: the share of all patches decoded and scored, at most --model.mask_ratio (0 = every
    masked patch; CrossMAE uses 0.25 with mask ratio 0.75)."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule: lr = blr x effective batch / 256, warmup then half-cycle cosine per step (or steps
    down x0.1 at --optim.milestones)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "epochs": POSITIVE_INT, "warmup_epochs": NON_NEGATIVE, "batch_size": POSITIVE_INT,
        "accum_iter": POSITIVE_INT, "blr": above(0), "lr": at_least(0, " (0 = from --optim.blr)"),
        "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "betas": each(FRACTION),
        "clip_grad": at_least(0, " (0 = off)"),
        "milestones": ((lambda v: all(map(finite, v)) and list(v) == sorted(v) and all(m > 0 for m in v)),
                       "increasing positive epochs"),
    }

    epochs: int = 20
    """Training epochs (a re-run with more epochs continues a finished run)."""
    warmup_epochs: float = 1.0
    """Epochs of linear lr warmup from 0 (fractions allowed)."""
    batch_size: int = 128
    """Per-process batch size; effective batch = batch_size x accum_iter x world size."""
    accum_iter: int = 1
    """Gradient accumulation steps per optimizer step."""
    blr: float = 1.5e-3
    """Base learning rate: lr = blr x effective batch / 256. Each command's default is its own (pretrain's 1.5e-3
    was chosen on Fashion-MNIST; the paper's 1.5e-4 is for 800+ epochs at batch 4096); see BENCHMARKS.md."""
    lr: float = 0.0
    """Absolute learning rate; overrides blr when > 0."""
    min_lr: float = 0.0
    """The lr the cosine schedule ends at."""
    weight_decay: float = 0.05
    """Decoupled weight decay (none on biases, norms, tokens and position embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (beta1, beta2); linprobe's LARS has no betas."""
    clip_grad: float = 0.0
    """Clip the gradient norm to this value (0 = off)."""
    milestones: tuple[float, ...] = ()
    """Epochs at which the lr drops x0.1 after warmup (a step schedule, mmpose's MultiStepLR, e.g. 170 200); empty:
    half-cycle cosine to min_lr."""


@dataclass(frozen=True)
class RunConfig:
    """Where and how a job runs."""

    RULES: ClassVar[dict[str, Rule]] = {"save_every": POSITIVE_INT, "keep_last": NON_NEGATIVE, "num_threads": NON_NEGATIVE,
                "seed": ((lambda v: finite(v) and 0 <= v <= 2**63 - 1), "in [0, 2**63-1]"),
                "dist_timeout": ((lambda v: finite(v) and 0 < v <= 7 * 86400), "> 0 and at most 604800 (7 days)")}

    output_dir: str = "runs/pretrain"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 autocast on CUDA with bf16 (else fp16 + scaler) and on CPUs with native bf16 (AVX512_BF16 or
    AMX), fp32 on other CPUs (emulated bf16 is many times slower there); fp16 needs CUDA."""
    compile: bool = False
    """torch.compile the model (faster steps after a one-off compile)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp replicates the model on every process; fsdp (pretrain and finetune) shards parameters,
    gradients and optimizer state over them (PyTorch FSDP2, each transformer block and the root; checkpoints sharded
    with torch.distributed.checkpoint)."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input and recompute the block in the backward pass: less activation
    memory for about a third more compute."""
    seed: int = 0
    save_every: int = 5
    """Write a checkpoint every N epochs (and always at the end)."""
    keep_last: int = 2
    """Checkpoints kept: the newest N by epoch and batch, older ones deleted after each save (0 = keep all)."""
    num_threads: int = 0
    """torch intra-op threads (0 = leave torch's default)."""
    progress: bool = True
    """Show progress on rank 0: a bar on a terminal, a plain line a minute when the output is redirected."""
    resume: str = ""
    """Checkpoint to resume from ('' = auto-resume from output_dir if it holds one)."""
    dist_timeout: float = 1800.0
    """Seconds a collective (all-reduce, barrier) of a torchrun job waits for the other ranks before the job
    fails with an error instead of hanging."""


# Pretraining crops of 50-100% of the image by default: on 28x28 images the paper's 0.2-1.0 hurt (BENCHMARKS.md).
PRETRAIN_CROP_SCALE = (0.5, 1.0)


@dataclass(frozen=True)
class EncoderConfig:
    """The ViT encoder a command builds: its sizes come from the checkpoint; name and overrides act with --init random."""

    RULES: ClassVar[dict[str, Rule]] = {"img_size": image_size(zero_ok=True), "embed_dim": NON_NEGATIVE, "depth": NON_NEGATIVE,
                    "num_heads": NON_NEGATIVE}

    name: str = "vit_tiny_d6_patch4"
    """Variant: vit_{tiny,small,base,large,huge}_patch{2,4,8,14,16} or vit_tiny_d6_patch4 (fastmae.models.vit.VARIANTS),
    used only with --init random (else the checkpoint decides)."""
    embed_dim: int = 0
    """With --init random: width override (0 = the variant's)."""
    depth: int = 0
    """With --init random: depth override (0 = the variant's)."""
    num_heads: int = 0
    """With --init random: heads override (0 = the variant's)."""
    img_size: tuple[int, int] = (0, 0)
    """Input height and width (0, 0 = the checkpoint's; else position embeddings are resampled)."""


@dataclass(frozen=True)
class ProbeModelConfig(EncoderConfig):
    """The frozen encoder judged by kNN / a linear probe, and which of its features are used."""

    global_pool: Literal["auto", "avg", "token", "tokens"] = "auto"
    """Features (after the encoder's final norm): avg: mean of the patch tokens; token: the cls token; tokens: every
    patch token, flattened (L x D numbers); auto: tokens for a patch grid of at most 64 patches (small images, where
    layout matters: chosen on held-out Fashion-MNIST training images, BENCHMARKS.md), else avg."""


@dataclass(frozen=True)
class DenseModelConfig(EncoderConfig):
    """The encoder under a dense-task head (segment, detect): its patch tokens after the final norm."""

    RULES: ClassVar[dict[str, Rule]] = {"drop_path": FRACTION}

    drop_path: float = 0.0
    """With --finetune: stochastic depth rate of the last block (linearly increasing from 0); frozen: unused."""


@dataclass(frozen=True)
class AugConfig:
    """Fine-tuning regularisation (the paper's ViT-B values are 0.8 / 1.0 / 0.1 / rand-m9 / 0.25)."""

    RULES: ClassVar[dict[str, Rule]] = {"mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "mix_prob": within(0, 1),
                "smoothing": FRACTION, "randaug_ops": NON_NEGATIVE, "randaug_magnitude": within(0, 10),
                "reprob": within(0, 1)}

    mixup: float = 0.8
    """Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """CutMix alpha (0 = off); when both are on, each batch picks one with probability 0.5."""
    mix_prob: float = 1.0
    """Probability of applying mixup/cutmix to a batch."""
    smoothing: float = 0.1
    """Label smoothing."""
    randaug_ops: int = 2
    """RandAugment operations per image (0 = off)."""
    randaug_magnitude: int = 9
    """RandAugment magnitude (0-10)."""
    reprob: float = 0.25
    """Random erasing probability (0 = off)."""


def to_dict(cfg) -> dict:
    """A dataclass config as plain JSON-able data."""
    return dataclasses.asdict(cfg)


def replace(cfg, **changes):
    """dataclasses.replace with nested 'section.field' keys: replace(cfg, **{'optim.epochs': 3})."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        if "." in key:
            section, rest = key.split(".", 1)
            nested.setdefault(section, {})[rest] = value
        else:
            flat[key] = value
    for section, sub in nested.items():
        flat[section] = replace(getattr(cfg, section), **sub)
    return dataclasses.replace(cfg, **flat)


def validate(cfg, prefix: str = "--") -> None:
    """A ValueError naming the flag as typed (`--optim.epochs must be >= 1, got 0`) for the first bad value.

    Commands call it first, so a typo fails in a second instead of after the data is indexed.
    """
    rules = {k: v for t in reversed(type(cfg).__mro__) for k, v in t.__dict__.get("RULES", {}).items()}
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            validate(value, flag + ".")
        elif f.name in rules and not rules[f.name][0](value):
            raise ValueError(f"{flag} must be {rules[f.name][1]}, got {_show(value)}")
    _check_relations(cfg, prefix)


def _show(value: Any) -> str:
    """A value as the user typed it: tuples space-separated."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _check_relations(cfg, prefix: str) -> None:
    """Rules between fields, and model names against the variant tables."""
    if isinstance(cfg, DataConfig) and cfg.holdout > 0 and cfg.eval_path:
        raise ValueError(f"{prefix}holdout takes the evaluation split from the training data, so "
                         f"{prefix}eval_path would be ignored: pass one of the two")
    if isinstance(cfg, OptimConfig) and cfg.lr > 0 and cfg.min_lr > cfg.lr:
        raise ValueError(f"{prefix}min_lr must be <= {prefix}lr ({cfg.lr}), got {cfg.min_lr}")
    if isinstance(cfg, (MAEModelConfig, EncoderConfig)):
        from .models.mae import MAE_VARIANTS
        from .models.vit import VARIANTS, variant_kwargs

        mae = isinstance(cfg, MAEModelConfig)
        try:
            kw = variant_kwargs(cfg.name, MAE_VARIANTS if mae else VARIANTS, kind="MAE" if mae else "ViT")
        except ValueError as e:
            raise ValueError(f"{prefix}name: {e}") from None
        if mae and any(s % kw["patch_size"] for s in cfg.img_size):  # a ViT's patch comes from its checkpoint
            raise ValueError(f"{prefix}img_size must be a multiple of {cfg.name}'s patch size {kw['patch_size']}, "
                             f"got {_show(cfg.img_size)}")
