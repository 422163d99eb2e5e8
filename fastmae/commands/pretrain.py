"""`fastmae pretrain`: the paper's MAE pretraining recipe on a folder, a list, or Fashion-MNIST."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from ..api import encode, feature_pool
from ..config import (
    PRETRAIN_CROP_SCALE,
    DataConfig,
    MAEModelConfig,
    OptimConfig,
    Rule,
    RunConfig,
    at_least,
    validate,
)
from ..data import build_loader, has_eval_split
from ..figures.curves import plot_learning_curve
from ..figures.reconstruction import reconstruct, save_figure
from ..metrics.knn import knn_accuracy
from ..models.mae import MAE_VARIANTS, MaskedAutoencoderViT
from ..models.vit import to_2tuple, variant_kwargs
from ..train.dist import print0
from ..train.engine import Task, extract_features
from ..train.optim import build_adamw, param_groups_weight_decay, schedule
from ..train.parallel import is_sharded, uses_fsdp
from ..train.runtime import Progress, Runtime, duration
from ..train.trainer import fit, model_meta, setup
from ..weights.backbone import check_decoder_flags, load_into, mae_kwargs
from ..weights.checkpoint import find_latest
from ..weights.read import ENCODER_PREFIXES, Weights, read_weights

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae pretrain --help`).

@dataclass(frozen=True)
class PretrainConfig:
    """Pretrain a masked autoencoder (MAE). With no flags: a small ViT on Fashion-MNIST (time per CPU class: README)."""

    RULES: ClassVar[dict[str, Rule]] = {"figure_every": at_least(0, " (0 = never)"), "knn_every": at_least(-1, " (-1 = never)")}

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


DECODER_PREFIXES = ("decoder_", "mask_token")


# Sizes a checkpoint fixes (heads are not in the weights: the flags may set them, see read_init).
ENCODER_SIZE_KEYS = ("patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio")
DECODER_SIZE_KEYS = ("decoder_embed_dim", "decoder_depth")
HEAD_KEYS = ("num_heads", "decoder_num_heads")


def _contradictions(cfg: MAEModelConfig, ckpt_kw: dict, keys: tuple[str, ...]) -> list[str]:
    """Flags (non-zero overrides, or a non-default --model.name) whose sizes differ from the checkpoint's."""
    bad = [f"--model.{k} {getattr(cfg, k)} (checkpoint: {ckpt_kw[k]})" for k in keys
           if k in ckpt_kw and getattr(cfg, k, 0) and getattr(cfg, k) != ckpt_kw[k]]
    if cfg.name != MAEModelConfig().name:
        named = variant_kwargs(cfg.name, MAE_VARIANTS, kind="MAE")
        bad += [f"--model.name {cfg.name}: {k} {named[k]} (checkpoint: {ckpt_kw[k]})" for k in keys
                if k in named and k in ckpt_kw and named[k] != ckpt_kw[k]]
    return bad


def init_kwargs(w: Weights, cfg: MAEModelConfig, in_chans: int) -> dict:
    """MAE kwargs when starting from `w`: encoder (and, for a full MAE, decoder) sizes from the checkpoint,
    the rest (a fresh decoder's sizes, img_size, norm_pix_loss) from the flags; one error for contradictions."""
    ckpt = dict(w.model_kwargs)
    keys = ENCODER_SIZE_KEYS + (DECODER_SIZE_KEYS if w.kind == "mae" else ())
    bad = _contradictions(cfg, ckpt, keys)
    if bad:
        raise ValueError(f"--init {w.source} fixes the model's sizes, but flags contradict it: {'; '.join(bad)}; "
                         f"drop those flags (sizes come from the checkpoint)")
    kw = mae_kwargs(cfg, in_chans)
    kw.update({k: ckpt[k] for k in keys + HEAD_KEYS[: 2 if w.kind == "mae" else 1] if k in ckpt})
    p = kw["patch_size"]
    if any(s % p for s in kw["img_size"]):
        raise ValueError(f"--model.img_size {kw['img_size'][0]} {kw['img_size'][1]} must be a multiple of the "
                         f"checkpoint's patch size {p} (--init {w.source})")
    return kw


def load_init(model: MaskedAutoencoderViT, w: Weights, ckpt_img_size: tuple[int, int]) -> list[str]:
    """Copy `w` into the model (positions resampled to its grid); returns what the log should say.

    A full MAE loads strictly; an encoder loads every encoder tensor, and the decoder keeps its fresh init
    (checked: nothing else may be missing, nothing may be left over)."""
    p = model.patch_size
    grid = (ckpt_img_size[0] // p, ckpt_img_size[1] // p)
    if w.kind == "mae":
        return ["encoder and decoder from the checkpoint"] + load_into(model, w.state_dict, grid,
                                                                        f"--init {w.source}: cannot load the MAE")
    sd = {k: v for k, v in w.state_dict.items() if k.startswith(ENCODER_PREFIXES) and not k.startswith("fc_norm.")}
    notes = load_into(model, sd, grid, f"--init {w.source}: cannot initialise the MAE encoder",
                      may_miss=DECODER_PREFIXES)
    return ["encoder from the checkpoint (encoder-only), decoder freshly initialised"] + notes


def read_init(init: str, cfg: MAEModelConfig) -> Weights:
    """The checkpoint to start from: a full MAE or an encoder; a classifier is refused with the reason.
    Attention heads are not in the weights: --model.num_heads / decoder_num_heads, when given, say them."""
    w = read_weights(init, num_heads=cfg.num_heads, decoder_num_heads=cfg.decoder_num_heads)
    if w.kind == "vit":
        raise ValueError(f"--init {init} is a classifier (a fine-tuned ViT); pretraining continues from an MAE "
                         f"(fastmae run, *_full.pth, mae_visualize_*.pth, ViTMAEForPreTraining) or an encoder "
                         f"(mae_pretrain_vit_*.pth, ViTMAEModel)")
    return w


def mae_loss(model: nn.Module, imgs: torch.Tensor, labels: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The MAE objective of a batch (labels unused): MSE on the removed patches."""
    return model(imgs, mask_ratio)[0]


class Monitor:
    """What pretraining shows at the end of an epoch: the reconstruction figure (rank 0) and the kNN top-1 of the
    encoder's features (`fastmae knn`'s default ones; all ranks take part), per --figure_every and --knn_every and
    at the last epoch."""

    def __init__(self, cfg: PretrainConfig, rt: Runtime, train):
        self.cfg, self.rt, self.train = cfg, rt, train
        self.figure_path = rt.out_dir / "reconstruction.png"
        self.images: torch.Tensor | None = None  # (8, C, H, W) fixed images for the figure
        # the figure runs the model: on rank 0, or on every rank when FSDP shards it (each forward is collective)
        if (rt.dist.is_main or uses_fsdp(rt)) and cfg.figure_every > 0:
            split = "eval" if has_eval_split(cfg.data) else "train"
            loader = build_loader(cfg.data, split, tuple(cfg.model.img_size), 8, train=False, seed=cfg.run.seed)
            loader.set_epoch(0)
            self.images = next(iter(loader))[0].to(rt.device)
        self.labelled = train.num_classes > 0 and has_eval_split(cfg.data) and cfg.knn_every >= 0
        self.last_knn: dict = {}

    def __call__(self, epoch: int, model: MaskedAutoencoderViT, prog: Progress) -> dict:
        """Extra entries for the epoch's log line."""
        cfg, out = self.cfg, {}
        last = epoch + 1 == cfg.optim.epochs
        model.eval()
        sharded = is_sharded(model)  # FSDP2: kNN calls encoder methods, not the root's forward hooks
        if sharded:
            model.unshard()  # the root's own weights (patch embedding, norms), whole on every rank
        try:
            if self.images is not None and ((epoch + 1) % cfg.figure_every == 0 or last):
                self.figure(model, epoch)
            if self.labelled and ((cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0) or last):
                t0 = time.perf_counter()
                out.update(self.knn(model))
                out["knn_seconds"] = time.perf_counter() - t0
                self.last_knn = dict(out, epoch=epoch + 1)
        finally:
            if sharded:
                model.reshard()
            model.train()
        return out

    def figure(self, model: MaskedAutoencoderViT, epoch: int) -> None:
        """reconstruction.png and figures/reconstruction-EPOCH.png, in fp32."""
        with torch.autocast(self.rt.device.type, enabled=False):
            panels = reconstruct(model, self.images, self.cfg.model.mask_ratio, seed=self.cfg.run.seed,
                                 mean=self.train.mean, std=self.train.std)
        if self.rt.dist.is_main:
            save_figure(panels, self.figure_path)
            save_figure(panels, self.rt.out_dir / "figures" / f"reconstruction-{epoch + 1:04d}.png")

    def knn(self, model: MaskedAutoencoderViT) -> dict:
        """knn_top1 / knn_top5 (k=20, T=0.07) of the features `fastmae knn` uses by default (`feature_pool('auto')`:
        every patch token on small patch grids, else their mean), evaluation split against training split; and
        knn_pool, which features those were."""
        cfg, rt, d = self.cfg, self.rt, self.rt.dist
        pool = feature_pool("auto", model)
        feats = {}
        for name in ("train", "eval"):
            loader = build_loader(cfg.data, name, tuple(cfg.model.img_size), 256, train=False, seed=cfg.run.seed,
                                  rank=d.rank, world_size=d.world_size)
            loader.set_epoch(0)
            feats[name] = extract_features(lambda x: encode(model, x, pool), loader, rt.device, rt.precision, d)
        acc = knn_accuracy(*feats["train"], *feats["eval"], num_classes=self.train.num_classes)
        return {**{f"knn_{k}": v for k, v in acc.items()}, "knn_pool": pool}


def run_pretrain(cfg: PretrainConfig) -> Path | None:
    """Pretrain an MAE; returns the last checkpoint path. Re-running the same command resumes."""
    validate(cfg)
    check_decoder_flags(cfg.model)
    rt = setup(cfg.run, cfg)
    d = rt.dist
    img_size = tuple(cfg.model.img_size)
    train = build_loader(cfg.data, "train", img_size, cfg.optim.batch_size, train=True, seed=cfg.run.seed,
                         rank=d.rank, world_size=d.world_size)
    init = read_init(cfg.init, cfg.model) if cfg.init else None
    other_decoder = init is not None and init.kind == "mae" and init.model_kwargs.get("decoder", "self") != cfg.model.decoder
    if other_decoder:  # a decoder of the other kind cannot be loaded into this one: the encoder, a fresh decoder
        init = init.encoder()
    kwargs = init_kwargs(init, cfg.model, train.channels) if init else mae_kwargs(cfg.model, train.channels)
    model = MaskedAutoencoderViT(**kwargs)
    if init is not None:
        resuming = cfg.run.resume or find_latest(rt.out_dir)
        if resuming:
            notes = [f"resuming from {resuming}, which takes precedence: its weights are used, not --init's "
                     f"(the sizes still come from --init)"]
        else:
            notes = load_init(model, init, to_2tuple(init.model_kwargs["img_size"]))
        was = init.model_kwargs.get("norm_pix_loss")
        if init.kind == "mae" and was is not None and was != kwargs["norm_pix_loss"]:
            notes.append(f"note: its decoder was trained with norm_pix_loss={was}, this run uses "
                         f"{kwargs['norm_pix_loss']} (--model.norm_pix_loss)")
        if other_decoder:
            notes.append(f"its decoder is not a --model.decoder {cfg.model.decoder} one: a fresh decoder")
        print0(d, f"init from {init.source}: {'; '.join(notes)}")
        rt.logger.record({"event": "init", "init": cfg.init, "source": init.source, "kind": init.kind,
                          "notes": notes})
    model = model.to(rt.device)
    steps = len(train)
    lr = schedule(cfg.optim, steps, d.world_size, train.num_samples)
    optimizer = build_adamw(param_groups_weight_decay(model, cfg.optim.weight_decay), lr.peak, cfg.optim.betas, rt.device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(d, f"MAE {cfg.model.name} {kwargs} | {n_params / 1e6:.2f}M trainable params | {train.num_samples} "
              f"images, {steps} steps/epoch | effective batch {lr.effective_batch}, lr {lr.peak:.3g} | {rt.precision_label} on "
              f"{rt.device} x{d.world_size} | output {rt.out_dir}")

    monitor = Monitor(cfg, rt, train)
    task = Task(model, optimizer, loss=functools.partial(mae_loss, mask_ratio=cfg.model.mask_ratio), lr=lr,
                meta=model_meta("mae", kwargs, cfg, mean=list(train.mean), std=list(train.std)),
                accum_iter=cfg.optim.accum_iter, clip_grad=cfg.optim.clip_grad, on_epoch_end=monitor, shardable=True)
    t0 = time.perf_counter()
    prog, path = fit(rt, task, train, cfg.optim.epochs)
    if train.skipped:
        print0(d, f"skipped {len(train.skipped)} unreadable image files (listed in {rt.out_dir / 'log.jsonl'})")
        rt.logger.record({"event": "skipped_files", "files": list(train.skipped)})
    if prog.epoch >= cfg.optim.epochs:
        curve = plot_learning_curve(rt.out_dir / "log.jsonl", rt.out_dir / "learning_curve.png",
                                    f"{cfg.model.name} on {cfg.data.source}") if d.is_main else None
        msg = f"done in {duration(time.perf_counter() - t0, prog)}: checkpoint {path}"
        if curve is not None:
            msg += f", learning curve {curve}"
        if monitor.images is not None:
            msg += f", figure {monitor.figure_path}"
        if monitor.last_knn:
            msg += f", kNN top-1 {monitor.last_knn['knn_top1']:.2f}% ({monitor.last_knn['knn_pool']} features"
            if monitor.last_knn["epoch"] != cfg.optim.epochs:  # the last epoch's kNN was cut short by a stop signal
                msg += f", after epoch {monitor.last_knn['epoch']}: the last epoch's was interrupted"
            msg += ")"
        print0(d, msg)
    return path


