"""`fastmae pretrain`: the paper's MAE pretraining recipe on a folder, a list, or Fashion-MNIST."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .api import encode
from .config import MAEModelConfig, PretrainConfig, validate
from .curves import plot_learning_curve
from .data import build_loader
from .dist import print0
from .engine import extract_features
from .knn import knn_accuracy
from .mae import MAE_VARIANTS, MaskedAutoencoderViT
from .optim import build_adamw, param_groups_weight_decay, schedule
from .trainer import Progress, fit, model_meta, setup
from .visualize import reconstruct, save_figure
from .vit import variant_kwargs

OVERRIDABLE = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def mae_kwargs(cfg: MAEModelConfig, in_chans: int) -> dict:
    """Constructor kwargs: the variant's sizes, overridden by every non-zero field of the config."""
    kw = variant_kwargs(cfg.name, MAE_VARIANTS, kind="MAE")
    kw.update({k: getattr(cfg, k) for k in OVERRIDABLE if getattr(cfg, k)})
    kw.update(img_size=tuple(cfg.img_size), in_chans=cfg.in_chans or in_chans, norm_pix_loss=cfg.norm_pix_loss)
    return kw


def has_eval_split(cfg: PretrainConfig) -> bool:
    return cfg.data.source == "fashion-mnist" or bool(cfg.data.eval_path)


def run_pretrain(cfg: PretrainConfig) -> Path | None:
    """Pretrain an MAE; returns the last checkpoint path. Re-running the same command resumes."""
    validate(cfg)
    rt = setup(cfg.run, cfg)
    d = rt.dist
    img_size = tuple(cfg.model.img_size)
    train = build_loader(cfg.data, "train", img_size, cfg.optim.batch_size, train=True, seed=cfg.run.seed,
                         rank=d.rank, world_size=d.world_size)
    kwargs = mae_kwargs(cfg.model, train.channels)
    model = MaskedAutoencoderViT(**kwargs).to(rt.device)
    steps = len(train)
    lr = schedule(cfg.optim, steps, d.world_size)
    optimizer = build_adamw(param_groups_weight_decay(model, cfg.optim.weight_decay), lr.peak, cfg.optim.betas, rt.device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(d, f"MAE {cfg.model.name} {kwargs} | {n_params / 1e6:.2f}M trainable params | {train.num_samples} "
              f"images, {steps} steps/epoch | effective batch {lr.effective_batch}, lr {lr.peak:.3g} | {rt.precision_label} on "
              f"{rt.device} x{d.world_size} | output {rt.out_dir}")

    split = "eval" if has_eval_split(cfg) else "train"
    viz_imgs = None
    if d.is_main and cfg.figure_every > 0:
        viz_loader = build_loader(cfg.data, split, img_size, 8, train=False, seed=cfg.run.seed)
        viz_loader.set_epoch(0)
        viz_imgs = next(iter(viz_loader))[0].to(rt.device)
    labelled = train.num_classes > 0 and has_eval_split(cfg) and cfg.knn_every >= 0
    figure_path = rt.out_dir / "reconstruction.png"
    knn_result: dict = {}

    def knn_monitor(m: MaskedAutoencoderViT) -> dict:
        feats = {}
        for name in ("train", "eval"):
            loader = build_loader(cfg.data, name, img_size, 256, train=False, seed=cfg.run.seed, rank=d.rank,
                                  world_size=d.world_size)
            loader.set_epoch(0)
            feats[name] = extract_features(lambda x: encode(m, x, "avg"), loader, rt.device, rt.precision, d)
        acc = knn_accuracy(*feats["train"], *feats["eval"], num_classes=train.num_classes)
        return {f"knn_{k}": v for k, v in acc.items()}  # knn_top1, knn_top5 in the pretraining log

    def on_epoch_end(epoch: int, m: MaskedAutoencoderViT, prog: Progress) -> dict:
        out: dict = {}
        last = epoch + 1 == cfg.optim.epochs
        m.eval()
        if viz_imgs is not None and ((epoch + 1) % cfg.figure_every == 0 or last):
            with torch.autocast(rt.device.type, enabled=False):
                panels = reconstruct(m, viz_imgs, cfg.model.mask_ratio, seed=cfg.run.seed,
                                     mean=train.mean, std=train.std)
            save_figure(panels, figure_path)
            save_figure(panels, rt.out_dir / "figures" / f"reconstruction-{epoch + 1:04d}.png")
        if labelled and ((cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0) or last):
            t0 = time.perf_counter()
            out.update(knn_monitor(m))
            out["knn_seconds"] = time.perf_counter() - t0
            knn_result.update(out)
        m.train()
        return out

    mask_ratio = cfg.model.mask_ratio
    t0 = time.perf_counter()
    prog, path = fit(
        rt, model, optimizer, train, epochs=cfg.optim.epochs,
        loss_fn=lambda m, imgs, _labels: m(imgs, mask_ratio)[0],
        lr_fn=lr,
        meta=model_meta("mae", kwargs, cfg, mean=list(train.mean), std=list(train.std)),
        accum_iter=cfg.optim.accum_iter, clip_grad=cfg.optim.clip_grad, on_epoch_end=on_epoch_end,
    )
    if train.skipped:
        print0(d, f"skipped {len(train.skipped)} unreadable image files (listed in {rt.out_dir / 'log.jsonl'})")
        rt.logger.record({"event": "skipped_files", "files": list(train.skipped)})
    if prog.epoch >= cfg.optim.epochs:
        curve = plot_learning_curve(rt.out_dir / "log.jsonl", rt.out_dir / "learning_curve.png",
                                    f"{cfg.model.name} on {cfg.data.source}") if d.is_main else None
        msg = f"done in {time.perf_counter() - t0:.0f}s: checkpoint {path}"
        if curve is not None:
            msg += f", learning curve {curve}"
        if viz_imgs is not None:
            msg += f", figure {figure_path}"
        if knn_result:
            msg += f", kNN top-1 {knn_result['knn_top1']:.2f}%"
        print0(d, msg)
    return path


