"""The seam where parallelism and compilation wrap a built model (torchtitan's order: build, then parallelize).

`parallelize` changes the model in place before training starts (activation checkpointing, FSDP2 sharding, the
optimizer rebound to the sharded parameters); `wrap_for_training` gives the module the loop calls (compile, DDP);
`unwrap_model` the plain one checkpoints store.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn as nn

from ..models.vit import Block
from .runtime import Runtime


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (an FSDP2 module is its own plain module)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def uses_fsdp(rt: Runtime) -> bool:
    """--run.parallel fsdp in a job of two or more processes (one process has nothing to shard over)."""
    return rt.run.parallel == "fsdp" and rt.dist.distributed


def is_sharded(model: nn.Module) -> bool:
    """The model's parameters are FSDP2 shards (DTensors): its state is saved and loaded with DCP."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap_model(model).parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU: gathered from the shards (a collective: call it on every rank) when FSDP2
    shards the model, else its plain state dict."""
    if not is_sharded(model):
        return unwrap_model(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


SHARDED_COMMANDS = ("pretrain", "finetune")  # the commands whose models --run.parallel fsdp shards


def fsdp_refusal(command: str) -> str:
    """The one line for --run.parallel fsdp where nothing is sharded."""
    return (f"--run.parallel fsdp is for fastmae pretrain and finetune (the models too large for one process); "
            f"{command} does not shard a model: use --run.parallel ddp (the default)")


def parallelize(rt: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer,
                shardable: bool = True) -> torch.optim.Optimizer:
    """Apply --run.activation_checkpointing and --run.parallel fsdp to `model` in place; returns the optimizer to
    train with (FSDP2 replaces every parameter by a sharded one, so the optimizer is rebuilt over those, with the
    same groups and settings; it must not have stepped yet: the resume loads its state afterwards)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for blk in blocks:
        blk.checkpointing = rt.run.activation_checkpointing
    if not uses_fsdp(rt):
        return optimizer
    if not shardable:
        raise ValueError(fsdp_refusal("this command"))
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # rank 0's weights everywhere, as DDP does at wrapping (ranks are seeded apart)
        for t in [*model.parameters(), *model.buffers()]:
            tdist.broadcast(t.data, src=0)
    names = {id(p): n for n, p in model.named_parameters()}
    mesh = init_device_mesh(rt.device.type, (rt.dist.world_size,))
    # bf16 compute with fp32 master weights and fp32 gradient reduction, as torchtitan; fp32 runs stay fp32
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if rt.precision == "bf16"
          else MixedPrecisionPolicy())
    # the MAE returns its prediction as a view (cls token sliced off); nothing here changes an output in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for blk in blocks:  # one all-gather per block, freed after its forward; the root holds the rest
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    params = dict(model.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[names[id(p)]] for p in g["params"]]}
              for g in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer).__init__).parameters  # defaults may hold more (AdamW: decoupled_...)
    return type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})


def wrap_for_training(rt: Runtime, model: nn.Module) -> nn.Module:
    """The module the loop calls: torch.compile'd with --run.compile, DDP-wrapped in a torchrun job (FSDP2 models
    are already sharded by `parallelize`)."""
    if rt.run.compile:
        model = torch.compile(model)
    if rt.dist.distributed and not uses_fsdp(rt):
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model
