"""A frozen encoder and its data for the evaluation commands (knn, linprobe, embed): the loaders without
augmentation, and the features of a whole split gathered from every rank.

Shapes: N samples, D feature width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..api import encode
from ..config import DataConfig, EncoderConfig
from ..data import build_loader
from ..weights.backbone import build_classifier, data_for, encoder_init
from .engine import extract_features
from .runtime import Runtime


def probe_encoder(init: str, model_cfg: EncoderConfig, data_cfg: DataConfig, rt: Runtime, batch_size: int,
                  labels_for: str = ""):
    """(frozen encoder, train loader without augmentation, eval loader, data config used) for probing; with
    `labels_for` (the method's name) data without two or more classes is refused before any feature is computed."""
    bb = encoder_init(init, model_cfg)
    data_cfg = data_for(bb, data_cfg)
    img_size = tuple(model_cfg.img_size) if model_cfg.img_size[0] else tuple(bb.model_kwargs["img_size"])
    d = rt.dist
    loaders = [build_loader(data_cfg, split, img_size, batch_size, train=False, seed=rt.run.seed, rank=d.rank,
                            world_size=d.world_size, drop_last=False) for split in ("train", "eval")]
    if labels_for:
        loaders[0].require_classes(labels_for)
    encoder = build_classifier(bb, model_cfg, num_classes=0, in_chans=loaders[0].channels, global_pool="token")
    encoder = encoder.to(rt.device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, loaders[0], loaders[1], data_cfg


def features_of(encoder: nn.Module, loader, pool: str, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features and (N,) labels of a whole split (all ranks)."""
    loader.set_epoch(0)
    return extract_features(lambda x: encode(encoder, x, pool), loader, rt.device, rt.precision, rt.dist)
