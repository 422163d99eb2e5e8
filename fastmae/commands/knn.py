"""`fastmae knn`: weighted k-nearest-neighbour top-1/top-5 of a frozen encoder's features, as in the paper.

Shapes: N samples, D feature width, K classes. The command builds the encoder with its final `norm` kept and takes
the features --model.global_pool names ('token': cls token; 'avg': mean of patch tokens; 'tokens': every patch
token, flattened; 'auto': tokens on small patch grids, else avg), as the pretraining kNN monitor and
`fastmae linprobe` do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..api import feature_pool
from ..config import (
    POSITIVE_INT,
    DataConfig,
    ProbeModelConfig,
    Rule,
    RunConfig,
    above,
    validate,
)
from ..metrics.knn import knn_accuracy
from ..train.probe import features_of, probe_encoder
from ..train.results import refuse_replacing, report_result
from ..train.trainer import setup

# ---------------------------------------------------------------------------------------------------
# The flags (`fastmae knn --help`).

@dataclass(frozen=True)
class KnnParams:
    """The kNN classifier (the DINO/MAE monitor's): cosine similarity, votes weighted by exp(sim / T)."""

    RULES: ClassVar[dict[str, Rule]] = {"k": POSITIVE_INT, "temperature": above(0), "batch_size": POSITIVE_INT}

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


def run_knn(cfg: KnnConfig) -> dict:
    """Weighted kNN top-1/top-5 of the encoder's features; writes knn.json to the output folder."""
    validate(cfg)
    if not cfg.knn.overwrite:
        refuse_replacing([Path(cfg.run.output_dir) / "knn.json"], "--knn.overwrite")
    rt = setup(cfg.run, cfg, write_config=False)  # written with knn.json: a failed run leaves the old pair
    t0 = time.perf_counter()
    encoder, train, val, _ = probe_encoder(cfg.init, cfg.model, cfg.data, rt, cfg.knn.batch_size, labels_for="kNN")
    pool = feature_pool(cfg.model.global_pool, encoder)
    tr, va = features_of(encoder, train, pool, rt), features_of(encoder, val, pool, rt)
    result = knn_accuracy(*tr, *va, num_classes=train.num_classes, k=cfg.knn.k, temperature=cfg.knn.temperature)
    result.update(init=cfg.init, pool=pool, k=cfg.knn.k, temperature=cfg.knn.temperature, train=len(tr[1]), eval=len(va[1]),
                  holdout=cfg.data.holdout, seconds=time.perf_counter() - t0)
    report_result(rt, "knn", f"kNN (k={cfg.knn.k}, T={cfg.knn.temperature}, {pool} features of {cfg.init})", result, cfg.data)
    return result
