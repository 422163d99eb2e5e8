"""Sharded training checkpoints (`--run.parallel fsdp`): model and optimizer state written by every rank with
torch.distributed.checkpoint (DCP) into `checkpoint-N.dcp/`, beside rank 0's `checkpoint-N.pt` (epoch, batch, RNG
streams; 'sharded' names the folder) and its `.json`. DCP re-shards on load, so such a run resumes on another number
of processes, or in one process without FSDP; `read_full_model` gives the whole model to fastmae.load and convert.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

MODEL_KEY, OPTIM_KEY = "model", "optimizer"


def dcp_folder(pt_path: str | Path) -> Path:
    """The DCP folder of a training checkpoint file: checkpoint-N.pt -> checkpoint-N.dcp."""
    return Path(pt_path).with_suffix(".dcp")


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the model and optimizer state to `folder` (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({MODEL_KEY: msd, OPTIM_KEY: osd}, checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load a DCP folder into a model and optimizer of any sharding (FSDP2 on any number of ranks, or plain)."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _check_folder(folder)
    msd, osd = get_state_dict(model, optimizer)
    alone = not (tdist.is_available() and tdist.is_initialized())
    with _quiet_single_process():
        dcp.load({MODEL_KEY: msd, OPTIM_KEY: osd}, checkpoint_id=str(folder), no_dist=alone)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def read_full_model(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict (name -> full tensor) of a DCP folder, read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _check_folder(folder)
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = MODEL_KEY + "."
    sd = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not sd:
        raise ValueError(f"{folder} holds no model weights (a damaged sharded checkpoint?); resume from an older one")
    with _quiet_single_process():
        dcp.load({MODEL_KEY: sd}, checkpoint_id=str(folder), no_dist=True)
    return sd


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes the intent is to load in a single process' when it reads without a process group:
    here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        yield


def _check_folder(folder: Path) -> None:
    if not (folder / ".metadata").is_file():
        raise ValueError(f"the sharded checkpoint {folder} is missing or incomplete (no .metadata): it was not "
                         f"copied whole, or its write was cut; copy it again, or move its .pt away to use an older one")


def replace_folder(tmp: Path, dst: Path) -> None:
    """Move a finished DCP folder into place, replacing an older one of the same name (a resave of the same point)."""
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)
