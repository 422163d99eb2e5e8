"""The seam where parallelism and compilation wrap a built model (torchtitan's order: build, then wrap).

`wrap_for_training` gives the module the loop calls; `unwrap_model` the plain one checkpoints store.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .runtime import Runtime


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def wrap_for_training(rt: Runtime, model: nn.Module) -> nn.Module:
    """The module the loop calls: torch.compile'd with --run.compile, DDP-wrapped in a torchrun job."""
    if rt.run.compile:
        model = torch.compile(model)
    if rt.dist.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model
