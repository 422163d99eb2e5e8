"""Typed, frozen configuration per command; field docstrings become `fastmae CMD --help`.

Nested sections turn into `--section.field` flags (tyro). Presets are plain functions below.
The resolved config is written as JSON next to the checkpoints (`config.json`). `validate` checks
the ranges of every field before a command starts work, naming the flag as the user types it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class SourceConfig:
    """Where images come from and how they are normalised: the data flags every command shares."""

    source: Literal["fashion-mnist", "folder", "unlabelled", "list"] = "fashion-mnist"
    """fashion-mnist: IDX .gz files; folder: one subfolder per class (ImageNet layout);
    unlabelled: every image under `path`, recursively; list: a text file of image paths
    (one per line, optionally followed by an integer label)."""
    path: str = FASHION_MNIST_DIR
    """Training data: the IDX folder, the image folder, or the list file."""
    eval_path: str = ""
    """Evaluation split for folder/list sources (Fashion-MNIST uses its t10k files)."""
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


@dataclass(frozen=True)
class DataConfig(SourceConfig):
    """Where images come from and how they become tensors."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range as a fraction of the image (the paper: 0.2-1.0)."""
    num_workers: int = 2
    """DataLoader worker processes for file-based sources (in-memory sources need none)."""
    skip_corrupt: bool = False
    """Skip unreadable/corrupt image files (counted and listed in the log) instead of stopping."""
    max_image_pixels: int = 0
    """Largest image (width x height) decoded; bigger files are refused as possible decompression bombs
    (0 = Pillow's limit, 178,956,970 pixels)."""
    holdout: int = 0
    """Hold out N training samples (a fixed random choice, the same in every run) as the evaluation split instead
    of the test / --data.eval_path one: tune on them, then report on the test split with 0 (the default)."""


@dataclass(frozen=True)
class SegDataConfig(SourceConfig):
    """Segmentation images: Fashion-MNIST scenes or an image folder (label maps: --seg.labels); batched at their
    own size, so no crop, loader workers or held-out split."""

    source: Literal["fashion-mnist", "folder"] = "fashion-mnist"
    """fashion-mnist: scenes pasted from its items (--seg.*); folder: images under --data.path, label maps under
    --seg.labels."""


@dataclass(frozen=True)
class MAEModelConfig:
    """The masked autoencoder; 0 means 'the variant's value'."""

    name: str = "mae_vit_tiny_d6_patch4"
    """Variant from fastmae.models.mae.MAE_VARIANTS (e.g. mae_vit_base_patch16); the default is the small-data one."""
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


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule: lr = blr x effective batch / 256, warmup then half-cycle cosine per step."""

    epochs: int = 20
    warmup_epochs: float = 1.0
    batch_size: int = 128
    """Per-process batch size; effective batch = batch_size x accum_iter x world size."""
    accum_iter: int = 1
    """Gradient accumulation steps per optimizer step."""
    blr: float = 1.5e-3
    """Base learning rate (for an effective batch of 256). The paper's 1.5e-4 is for 800+ epochs at batch 4096;
    short runs on small data need a larger one (the pretrain default 1.5e-3 was chosen on Fashion-MNIST)."""
    lr: float = 0.0
    """Absolute learning rate; overrides blr when > 0."""
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 0.0
    """Clip the gradient norm to this value (0 = off)."""


@dataclass(frozen=True)
class RunConfig:
    """Where and how a job runs."""

    output_dir: str = "runs/pretrain"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 autocast on CUDA with bf16 (else fp16 + scaler) and on CPUs with native bf16 (AVX512_BF16 or
    AMX), fp32 on other CPUs (emulated bf16 is many times slower there); fp16 needs CUDA."""
    compile: bool = False
    """torch.compile the model (faster steps after a one-off compile)."""
    seed: int = 0
    save_every: int = 5
    """Write a checkpoint every N epochs (and always at the end)."""
    keep_last: int = 2
    """Numbered checkpoints kept besides checkpoint-last (0 = keep all)."""
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
class PretrainConfig:
    """Pretrain a masked autoencoder (MAE). With no flags: a small ViT on Fashion-MNIST (time per CPU class: README)."""

    recipe: Literal["", "fmnist-small", "paper"] = ""
    """A named recipe (fastmae/recipes.py) as the starting point; flags given with it override its values.
    fmnist-small: small images on a CPU (the defaults here); paper: the paper's ImageNet values (pass --data.path)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=PRETRAIN_CROP_SCALE))
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    figure_every: int = 1
    """Save a reconstruction figure every N epochs (0 = never)."""
    knn_every: int = 0
    """kNN monitor (k=20, T=0.07, the features `fastmae knn` uses by default) on the evaluation split every N
    epochs and at the end (0 = only at the end, -1 = never; needs a labelled source with an evaluation split)."""
    init: str = ""
    """Weights to continue pretraining from ('' = random init): a fastmae run folder or checkpoint, an official
    *_full.pth / mae_visualize_*.pth, a Hugging Face ViTMAE folder, or a released name (mae_pretrain_vit_base_full).
    Encoder-only checkpoints (mae_pretrain_vit_*.pth, ViTMAEModel) initialise the encoder; the decoder starts
    fresh. Sizes come from the checkpoint; a checkpoint in --run.output_dir (resume) takes precedence."""


@dataclass(frozen=True)
class EncoderConfig:
    """The ViT encoder a command builds: its sizes come from the checkpoint; name and overrides act with --init random."""

    name: str = "vit_tiny_d6_patch4"
    """Variant from fastmae.models.vit.VARIANTS, used only with --init random (else the checkpoint decides)."""
    embed_dim: int = 0
    """With --init random: width override (0 = the variant's)."""
    depth: int = 0
    """With --init random: depth override (0 = the variant's)."""
    num_heads: int = 0
    """With --init random: heads override (0 = the variant's)."""
    img_size: tuple[int, int] = (0, 0)
    """Input height and width (0, 0 = the checkpoint's; else position embeddings are resampled)."""


@dataclass(frozen=True)
class ViTModelConfig(EncoderConfig):
    """The classification ViT fine-tuning trains: the encoder, its pooling and stochastic depth."""

    global_pool: Literal["avg", "token"] = "avg"
    """avg: mean of patch tokens + fc_norm (the MAE fine-tuning default); token: cls token + norm."""
    drop_path: float = 0.1
    """Stochastic depth rate of the last block (linearly increasing from 0)."""


@dataclass(frozen=True)
class ProbeModelConfig(EncoderConfig):
    """The frozen encoder judged by kNN / a linear probe, and which of its features are used."""

    global_pool: Literal["auto", "avg", "token", "tokens"] = "auto"
    """Features (after the encoder's final norm): avg: mean of the patch tokens; token: the cls token; tokens: every
    patch token, flattened (L x D numbers); auto: tokens for a patch grid of at most 64 patches (small images, where
    layout matters: chosen on held-out Fashion-MNIST training images, BENCHMARKS.md), else avg."""


@dataclass(frozen=True)
class SegModelConfig(EncoderConfig):
    """The encoder under a segmentation head (its patch tokens after the final norm, at the data's own size)."""

    drop_path: float = 0.0
    """With --finetune: stochastic depth rate of the last block (linearly increasing from 0); frozen: unused."""


@dataclass(frozen=True)
class AugConfig:
    """Fine-tuning regularisation (the paper's ViT-B values are 0.8 / 1.0 / 0.1 / rand-m9 / 0.25)."""

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


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune a classification ViT from an MAE checkpoint (or from random init) and evaluate it each epoch."""

    recipe: Literal["", "fmnist-small", "paper"] = ""
    """A named recipe (fastmae/recipes.py) as the starting point; flags given with it override its values.
    fmnist-small: small images on a CPU (30 epochs, light augmentation); the defaults here are the paper's schedule at a small batch; paper: the paper's ImageNet values (pass --data.path)."""
    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder to start from, or 'random' for training from scratch."""
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=(0.08, 1.0)))
    model: ViTModelConfig = field(default_factory=ViTModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=100, warmup_epochs=5.0, batch_size=64, blr=5e-4, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999)))
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i gets lr x layer_decay^(depth + 1 - i)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune"))


@dataclass(frozen=True)
class LinprobeConfig:
    """Linear probe: frozen encoder, BatchNorm without affine, then a linear head trained with LARS."""

    recipe: Literal["", "fmnist-small", "paper"] = ""
    """A named recipe (fastmae/recipes.py) as the starting point; flags given with it override its values.
    fmnist-small: small images on a CPU (the defaults here); paper: the paper's ImageNet values (pass --data.path)."""
    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, or 'random' for a randomly initialised encoder."""
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=(0.08, 1.0)))
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    augment: bool = False
    """True: the paper's RandomResizedCrop + flip every epoch (the encoder runs each epoch); False: features
    of the unaugmented images are extracted once and cached (much faster on a CPU)."""
    overwrite: bool = False
    """Replace the linprobe.json and head checkpoint of an earlier finished run in --run.output_dir (otherwise they
    stop the command before any work; an unfinished --augment run resumes as training commands do)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=90, warmup_epochs=10.0, batch_size=256, blr=16.0, weight_decay=0.0))
    """LARS lr = blr x batch / 256 (the paper's blr 0.1 is for batch 16384; BENCHMARKS.md has the small-batch
    search behind the default)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/linprobe"))


@dataclass(frozen=True)
class KnnParams:
    """The kNN classifier (the DINO/MAE monitor's): cosine similarity, votes weighted by exp(sim / T)."""

    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256
    """Images per batch when extracting features."""
    overwrite: bool = False
    """Replace the knn.json of an earlier run in --run.output_dir (otherwise it stops the command before any work)."""


@dataclass(frozen=True)
class KnnConfig:
    """Weighted kNN (cosine similarity, temperature-weighted vote) on encoder features of train/eval splits."""

    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, or 'random' for a randomly initialised encoder."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    knn: KnnParams = field(default_factory=KnnParams)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/knn"))


@dataclass(frozen=True)
class SegParams:
    """Segmentation data and head: Fashion-MNIST scenes (--data.source fashion-mnist) or image + label folders."""

    labels: str = ""
    """--data.source folder: the label maps of --data.path (the label of images/a/b.jpg is LABELS/a/b.png;
    'P' PNGs: palette index = class, 'L' PNGs: value = class)."""
    eval_labels: str = ""
    """--data.source folder: the label maps of --data.eval_path."""
    num_classes: int = 0
    """Classes, background included (0 = 1 + the largest training label; Fashion-MNIST scenes: 11)."""
    ignore_index: int = 255
    """Label value that is neither trained on nor scored."""
    train_scenes: int = 10000
    """Fashion-MNIST scenes built from the train split."""
    eval_scenes: int = 2000
    """Fashion-MNIST scenes built from the t10k split."""
    scene_size: int = 84
    """Scene height and width in pixels (a multiple of the encoder's patch size)."""
    items: tuple[int, int] = (2, 4)
    """Fewest and most Fashion-MNIST items pasted into one scene."""
    fpn_channels: int = 32
    """--head fpn: channels of the feature pyramid and the head (small for CPUs; ViTDet uses 256)."""
    figure_rows: int = 4
    """Evaluation images shown in segmentation.png."""


@dataclass(frozen=True)
class SegmentConfig:
    """Semantic segmentation on a frozen (or fine-tuned) encoder: mIoU and pixel accuracy on the evaluation split."""

    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, or 'random' for a randomly initialised encoder."""
    head: Literal["linear", "fpn"] = "linear"
    """linear: BatchNorm + 1x1 conv on the patch map; fpn: a simple feature pyramid (x4, x2, x1, x0.5 of the
    patch grid) fused by an FPN head. Logits are upsampled bilinearly to the image size."""
    finetune: bool = False
    """Train the encoder too (layer-wise lr decay, --layer_decay); default: frozen encoder, only the head trains."""
    layer_decay: float = 0.75
    """With --finetune: block i gets lr x layer_decay^(depth + 1 - i); the head gets the full lr."""
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    seg: SegParams = field(default_factory=SegParams)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        epochs=5, warmup_epochs=0.5, batch_size=64, blr=4e-3, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999)))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/segment"))


@dataclass(frozen=True)
class ReadModelConfig:
    """What a checkpoint may not record: attention heads (not in the weights) and the pixel target."""

    num_heads: int = 0
    """Encoder heads (0 = from the checkpoint's config/metadata, else the standard width table)."""
    decoder_num_heads: int = 0
    """Decoder heads (0 = from the checkpoint's config/metadata, else the standard width table)."""
    img_size: tuple[int, int] = (0, 0)
    """Image height and width (0, 0 = square, from the position embedding); needed for non-square grids."""


@dataclass(frozen=True)
class VisualizeModelConfig:
    """The MAE to reconstruct with, and its masking."""

    mask_ratio: float = 0.75
    num_heads: int = 0
    """Encoder heads for checkpoints that do not record them (0 = metadata, else the standard width table)."""
    decoder_num_heads: int = 0
    """Decoder heads for checkpoints that do not record them (0 = metadata, else the standard width table)."""
    norm_pix_loss: bool | None = None
    """Whether the checkpoint predicts per-patch normalised pixels (None = its metadata; official *_full.pth
    and visualize checkpoints do not record it: the official pretraining used True)."""


@dataclass(frozen=True)
class VisualizeRunConfig:
    """Where the figure is computed; the seed picks the mask (the same seed gives the same mask)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


@dataclass(frozen=True)
class VisualizeConfig:
    """Save the MAE demo figure (original / masked / reconstruction / reconstruction + visible) as PNG."""

    init: str = "runs/pretrain"
    """MAE checkpoint (fastmae run folder or file, official *_full.pth / visualize, Hugging Face ViTMAEForPreTraining)."""
    images: tuple[str, ...] = ()
    """Image files or folders; empty = the first --num samples of the data's evaluation split."""
    data: DataConfig = field(default_factory=DataConfig)
    model: VisualizeModelConfig = field(default_factory=VisualizeModelConfig)
    run: VisualizeRunConfig = field(default_factory=VisualizeRunConfig)
    num: int = 8
    """Images to show when taking dataset samples."""
    output: str = "reconstruction.png"
    """Output PNG (a grid); with --per_image, a folder with one PNG per image."""
    per_image: bool = False
    overwrite: bool = False
    """Replace existing figures (otherwise an existing --output, or a per-image PNG of the same name, stops the
    command before anything is written)."""


@dataclass(frozen=True)
class ConvertConfig:
    """Convert a checkpoint between fastmae, the official MAE release, Hugging Face and timm.

    fastmae convert --init mae_visualize_vit_base.pth --output vit-mae-base --to hf
    fastmae convert --init vit-mae-base --output mae_base --to fastmae   (writes mae_base.safetensors + .json)
    """

    init: str
    """Input: a .pth/.pt/.bin/.safetensors file (official, fastmae, timm or HF weights), a Hugging Face model
    folder (config.json + model.safetensors or pytorch_model.bin), or a fastmae run folder."""
    output: str
    """Output. fastmae: a path without extension (X.safetensors + X.json); hf: a folder; timm: a .safetensors
    or .pth file; official: a .pth file holding {'model': state_dict}."""
    to: Literal["fastmae", "hf", "timm", "official"] = "fastmae"
    """Target format. hf: MAE -> ViTMAEForPreTraining, encoder -> ViTMAEModel, cls-token classifier ->
    ViTForImageClassification. timm/official keep the official names (timm drops an MAE's decoder)."""
    model: ReadModelConfig = field(default_factory=ReadModelConfig)


@dataclass(frozen=True)
class BenchParams:
    """What to time and for how long."""

    tasks: tuple[Literal["pretrain", "finetune", "data"], ...] = ("pretrain", "finetune", "data")
    """pretrain: one MAE train step; finetune: one classification-ViT train step on all tokens; data: the
    training loader of --data.* alone (img/s with --data.num_workers workers)."""
    batch_size: int = 128
    num_classes: int = 10
    """Classes of the fine-tuning head."""
    rounds: int = 3
    """Timed rounds per implementation (interleaved with --compare hf); the table shows medians."""
    round_seconds: float = 2.0
    """Target seconds per round."""
    data_batches: int = 20
    """Batches the loader timing reads (after one warm-up batch)."""
    quiet_wait: float = 5.0
    """On a CPU, wait up to this many seconds before each round for other processes to go idle (0 = never):
    a step timed while another process takes a core is several times slower."""


@dataclass(frozen=True)
class BenchRunConfig:
    """Where and how the steps run."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = the rule every command uses (bf16 only where the CPU or GPU computes it natively)."""
    compile: bool = False
    """Also time torch.compile(model) (its first step compiles: 30-60 s on a CPU)."""
    num_threads: int = 0
    """torch intra-op threads (0 = leave torch's default)."""
    output: str = ""
    """Also write the results as JSON to this file ('' = print only)."""


@dataclass(frozen=True)
class BenchConfig:
    """Speed on this machine: train-step img/s, ms/step, peak memory, FLOPs/img and share of the measured matmul
    peak for a model, and how much of the step its matmuls alone take; the data loader's img/s beside it; with
    --compare hf, Hugging Face side by side."""

    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=PRETRAIN_CROP_SCALE))
    bench: BenchParams = field(default_factory=BenchParams)
    run: BenchRunConfig = field(default_factory=BenchRunConfig)
    compare: Literal["none", "hf"] = "none"
    """hf: time transformers' ViTMAEForPreTraining / ViTForImageClassification of the same sizes, interleaved."""


@dataclass(frozen=True)
class EmbedParams:
    """Which features, of which split, in which file format."""

    pool: str = "token"
    """avg: mean of the patch tokens after the final norm (N, D); token: the cls token (N, D); dense: the
    patch-token maps (N, D, h, w)."""
    split: str = "both"
    """train, eval or both (each split is one file)."""
    format: str = "safetensors"
    """safetensors: SPLIT.safetensors with 'features' and 'labels'; npy: SPLIT.features.npy and SPLIT.labels.npy.
    Image files are listed in SPLIT.txt in row order (Fashion-MNIST rows are the split's indices 0..N-1)."""
    overwrite: bool = False
    """Replace existing outputs (otherwise an existing file stops the command before any work)."""
    batch_size: int = 256
    """Images per batch."""


@dataclass(frozen=True)
class EmbedConfig:
    """Write encoder features of a dataset to disk (your own heads, retrieval, clustering): features, labels, files.

    fastmae embed --init runs/pretrain --embed.pool avg --run.output_dir runs/embed   (train.safetensors, eval.safetensors)
    """

    init: str = "runs/pretrain"
    """MAE/ViT checkpoint file or run folder, a released name (mae_pretrain_vit_base), or 'random'."""
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    """The encoder (--model.img_size: inputs at another size, positions resampled)."""
    embed: EmbedParams = field(default_factory=lambda: EmbedParams())
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/embed"))


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


# ---------------------------------------------------------------------------------------------
# Range checks: one table of rules per config class, so a bad flag fails before any work starts.

Rule = tuple[Callable[[Any], bool], str]  # (value is fine, what the value must be)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(lo: float, note: str = "") -> Rule:
    return (lambda v: _finite(v) and v >= lo), f">= {lo}{note}"


def _above(lo: float) -> Rule:
    return (lambda v: _finite(v) and v > lo), f"> {lo}"


def _within(lo: float, hi: float, open_hi: bool = False) -> Rule:
    return (lambda v: _finite(v) and lo <= v and (v < hi if open_hi else v <= hi)), (
        f"in [{lo}, {hi}{')' if open_hi else ']'}")


def _each(rule: Rule) -> Rule:
    ok, text = rule
    return (lambda v: all(ok(x) for x in v)), f"all {text}"


def _size(zero_ok: bool) -> Rule:
    def ok(v: Any) -> bool:
        return len(v) == 2 and (all(_finite(x) and x >= 1 for x in v) or (zero_ok and tuple(v) == (0, 0)))

    return ok, "two positive integers H W" + (" (or 0 0 for the checkpoint's)" if zero_ok else "")


_NON_NEGATIVE = _at_least(0)
_POSITIVE_INT = _at_least(1)
_FRACTION = _within(0, 1, open_hi=True)

# per class; validate applies a class's rules and those of its bases (a subclass adds fields, never relaxes one)
RULES: dict[type, dict[str, Rule]] = {
    SourceConfig: {"channels": _at_least(0, " (0 = the source's own)"), "limit": _NON_NEGATIVE,
                   "mean": _each((_finite, "finite")), "std": _each(_above(0))},
    DataConfig: {
        "num_workers": _NON_NEGATIVE, "holdout": _at_least(0, " (0 = the source's own evaluation split)"),
        "max_image_pixels": _at_least(0, " (0 = Pillow's limit)"),
        "crop_scale": ((lambda v: len(v) == 2 and all(map(_finite, v)) and 0 < v[0] <= v[1] <= 1),
                       "(min, max) with 0 < min <= max <= 1"),
    },
    MAEModelConfig: {
        "img_size": _size(zero_ok=False),
        "mask_ratio": ((lambda v: _finite(v) and 0 < v < 1), "in (0, 1) (0 masks nothing, so nothing is learned)"),
        **dict.fromkeys(("in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                         "decoder_num_heads"), _at_least(0, " (0 = the variant's)")),
    },
    OptimConfig: {
        "epochs": _POSITIVE_INT, "warmup_epochs": _NON_NEGATIVE, "batch_size": _POSITIVE_INT,
        "accum_iter": _POSITIVE_INT, "blr": _above(0), "lr": _at_least(0, " (0 = from --optim.blr)"),
        "min_lr": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE, "betas": _each(_FRACTION),
        "clip_grad": _at_least(0, " (0 = off)"),
    },
    RunConfig: {"save_every": _POSITIVE_INT, "keep_last": _NON_NEGATIVE, "num_threads": _NON_NEGATIVE,
                "seed": ((lambda v: _finite(v) and 0 <= v <= 2**63 - 1), "in [0, 2**63-1]"),
                "dist_timeout": ((lambda v: _finite(v) and 0 < v <= 7 * 86400), "> 0 and at most 604800 (7 days)")},
    PretrainConfig: {"figure_every": _at_least(0, " (0 = never)"), "knn_every": _at_least(-1, " (-1 = never)")},
    EncoderConfig: {"img_size": _size(zero_ok=True), "embed_dim": _NON_NEGATIVE, "depth": _NON_NEGATIVE,
                    "num_heads": _NON_NEGATIVE},
    ViTModelConfig: {"drop_path": _FRACTION},
    SegModelConfig: {"drop_path": _FRACTION},
    AugConfig: {"mixup": _NON_NEGATIVE, "cutmix": _NON_NEGATIVE, "mix_prob": _within(0, 1),
                "smoothing": _FRACTION, "randaug_ops": _NON_NEGATIVE, "randaug_magnitude": _within(0, 10),
                "reprob": _within(0, 1)},
    FinetuneConfig: {"layer_decay": ((lambda v: _finite(v) and 0 < v <= 1), "in (0, 1]")},
    KnnParams: {"k": _POSITIVE_INT, "temperature": _above(0), "batch_size": _POSITIVE_INT},
    ReadModelConfig: {"num_heads": _NON_NEGATIVE, "decoder_num_heads": _NON_NEGATIVE, "img_size": _size(zero_ok=True)},
    VisualizeModelConfig: {"num_heads": _NON_NEGATIVE, "decoder_num_heads": _NON_NEGATIVE, "mask_ratio": _FRACTION},
    VisualizeConfig: {"num": _POSITIVE_INT},
    BenchParams: {"batch_size": _POSITIVE_INT, "num_classes": _POSITIVE_INT, "rounds": _POSITIVE_INT,
                  "round_seconds": _above(0), "data_batches": _POSITIVE_INT, "quiet_wait": _NON_NEGATIVE,
                  "tasks": ((lambda v: len(v) > 0), "one or more of pretrain finetune data")},
    BenchRunConfig: {"num_threads": _NON_NEGATIVE},
    EmbedParams: {"pool": ((lambda v: v in ("avg", "token", "dense")), "one of avg, token, dense"),
                  "split": ((lambda v: v in ("train", "eval", "both")), "one of train, eval, both"),
                  "format": ((lambda v: v in ("safetensors", "npy")), "one of safetensors, npy"),
                  "batch_size": _POSITIVE_INT},
    SegParams: {"num_classes": _NON_NEGATIVE, "ignore_index": _within(0, 255), "train_scenes": _POSITIVE_INT,
                "eval_scenes": _POSITIVE_INT, "scene_size": _at_least(28, " (the Fashion-MNIST item size)"),
                "items": ((lambda v: len(v) == 2 and all(map(_finite, v)) and 1 <= v[0] <= v[1]),
                          "(fewest, most) with 1 <= fewest <= most"),
                "fpn_channels": _POSITIVE_INT, "figure_rows": _NON_NEGATIVE},
    SegmentConfig: {"layer_decay": ((lambda v: _finite(v) and 0 < v <= 1), "in (0, 1]")},
}


def validate(cfg, prefix: str = "--") -> None:
    """A ValueError naming the flag as typed (`--optim.epochs must be >= 1, got 0`) for the first bad value.

    Commands call it first, so a typo fails in a second instead of after the data is indexed.
    """
    rules = {k: v for t in reversed(type(cfg).__mro__) for k, v in RULES.get(t, {}).items()}
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
