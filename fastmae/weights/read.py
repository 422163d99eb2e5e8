"""The one way weights come in: any supported path -> `Weights` (fastmae names, constructor kwargs, data stats).

`read_weights` finds the file a path means (a run folder's newest checkpoint, a Hugging Face folder, a
fastmae export named without its extension), reads it (safetensors or torch.load(weights_only=True)),
converts it to fastmae names and checks names and shapes. `fastmae.load` builds a model from it;
fine-tuning and probing take the encoder part without building anything in between.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..models.vit import to_2tuple
from . import hub
from .checkpoint import find_latest
from .convert import HF_WEIGHT_FILES, Kind, hf_vitpose_to_fastmae, is_vitpose, read_file, to_fastmae

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")
ENCODER_KWARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps")


@dataclass
class Weights:
    """A checkpoint in fastmae terms. state_dict None = random initialisation (sizes only)."""

    kind: Kind  # 'mae' (encoder + decoder), 'vit' (classifier) or 'encoder'
    state_dict: dict[str, torch.Tensor] | None
    model_kwargs: dict
    mean: tuple[float, ...] | None = None  # data normalisation it was trained with (defaults when not recorded)
    std: tuple[float, ...] | None = None
    stats_known: bool = False  # False: mean/std are the defaults for its channel count, a guess
    source: str = ""
    extra: dict = field(default_factory=dict)  # source_format, mask_ratio, ...

    def encoder(self) -> Weights:
        """Only the encoder: its tensors (no decoder, no head) and its constructor kwargs."""
        kw = {k: self.model_kwargs[k] for k in ENCODER_KWARGS if k in self.model_kwargs}
        kw["img_size"] = to_2tuple(kw["img_size"])
        sd = None if self.state_dict is None else {
            k: v for k, v in self.state_dict.items() if k.startswith(ENCODER_PREFIXES)}
        return Weights("encoder", sd, kw, self.mean, self.std, self.stats_known, self.source, dict(self.extra))


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation assumed when a checkpoint does not record one: ImageNet's for RGB, 0.5 otherwise."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def find_source(p: Path, variant_names: Sequence[str] = ()) -> Path:
    """The weights file/folder a path names: a run folder's newest checkpoint, a Hugging Face folder,
    a file, `X` for a fastmae export X.safetensors + X.json, or a released checkpoint's name (`fastmae.weights.hub`)."""
    if p.is_dir():
        latest = find_latest(p)
        if latest is not None:
            return latest
        if (p / "config.json").exists() and any((p / f).exists() for f in HF_WEIGHT_FILES):
            return p
        raise FileNotFoundError(
            f"{p} is a folder without training checkpoints (checkpoint-*.pt) or Hugging Face weights "
            f"(config.json + {' / '.join(HF_WEIGHT_FILES)}); pass a run folder, a checkpoint file or a model folder"
        )
    if p.exists():
        return p
    export = p.with_name(p.name + ".safetensors")
    if export.exists():
        return export
    if hub.is_bare_name(p) and hub.release_name(p):
        return hub.fetch(p.name)  # a released checkpoint by name: the cached file, downloaded once
    if hub.looks_official(p):
        raise hub.unknown_name_error(p)
    known = f", and it is not a variant name ({', '.join(variant_names)})" if variant_names else ""
    raise FileNotFoundError(f"{p} does not exist{known}")


def _hf_stats(folder: Path) -> tuple[list[float], list[float]] | None:
    """image_mean/image_std of a Hugging Face folder's preprocessor_config.json, if it has one."""
    f = folder / "preprocessor_config.json"
    if not f.exists():
        return None
    try:
        pre = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    if isinstance(pre, dict) and isinstance(pre.get("image_mean"), list) and isinstance(pre.get("image_std"), list):
        return pre["image_mean"], pre["image_std"]
    return None


def read_weights(path: str | Path, *, num_heads: int = 0, decoder_num_heads: int = 0,
                 variant_names: Sequence[str] = (), norm_pix_loss: bool | None = None) -> Weights:
    """Weights of any supported checkpoint (see `fastmae.load` for the list), checked against the fastmae model.

    num_heads / decoder_num_heads: attention heads when the checkpoint does not record them (0 = metadata or
    config, else the standard widths). norm_pix_loss: the MAE decoder's pixel target as the caller says it (None:
    the file's record, the release's, else raw pixels with a warning).
    """
    src = find_source(Path(path).expanduser(), variant_names)
    try:
        sd, config = read_file(src)
    except ValueError as e:  # a damaged download in the cache is fastmae's own copy: it can be fetched again
        name = hub.release_name(src)
        if name is None or src.resolve() != (hub.cache_dir() / f"{name}.pth").resolve():
            raise
        raise ValueError(f"the cached download of {name}, {src}, cannot be read ({str(e).split('; it may')[0]}); "
                         f"delete it (rm {src}) and it is downloaded again") from None
    kind, sd, kw, extra = to_fastmae(sd, config, num_heads, decoder_num_heads)
    release = hub.RELEASES.get(hub.release_name(src) or "")
    if kind == "mae" and norm_pix_loss is not None:
        kw["norm_pix_loss"] = norm_pix_loss  # said by the caller: nothing to guess or warn about
    elif kind == "mae" and "norm_pix_loss" not in kw and release is not None and release.norm_pix_loss is not None:
        kw["norm_pix_loss"] = release.norm_pix_loss  # official files do not record their pixel target
    elif kind == "mae" and "norm_pix_loss" not in kw and not src.is_dir() and src.suffix not in (".pt", ".safetensors"):
        full = ", ".join(n for n in hub.RELEASES if n.endswith("_full"))
        warnings.warn(f"{src} does not record the pixel target of its decoder, so it is read as predicting raw pixels "
                      f"(norm_pix_loss False); the official *_full files predict per-patch normalised pixels: for one "
                      f"of those pass --model.norm_pix_loss (fastmae.load(..., norm_pix_loss=True)) or its release "
                      f"name ({full})", RuntimeWarning, stacklevel=2)
    mean, std = extra.get("mean"), extra.get("std")
    if mean is None and src.is_dir():
        mean, std = _hf_stats(src) or (None, None)
    channels = int(kw.get("in_chans", 3))
    known = mean is not None and std is not None and len(mean) == channels and len(std) == channels
    if not known:
        mean, std = default_stats(channels)
        if src.suffix in (".pt", ".safetensors") and extra.get("source_format", "").startswith("fastmae"):
            # a fastmae checkpoint or export copied without its .json (official .pth files never record it)
            beside = src.with_suffix(".json")
            where = (f"{beside} records no data normalisation" if beside.is_file()
                     else f"{src} has no metadata beside it (its .json)")
            warnings.warn(f"{where}: guessed data mean {mean}, std {std}"
                          + (", norm_pix_loss False" if kind == "mae" and "norm_pix_loss" not in kw else "")
                          + "; pass --data.mean/--data.std (and --model.norm_pix_loss) if they differ",
                          RuntimeWarning, stacklevel=2)
    return Weights(kind, sd, kw, tuple(float(m) for m in mean), tuple(float(s) for s in std), known, str(src), extra)


@dataclass
class PoseWeights:
    """A whole pose model (`fastmae pose` run or Hugging Face VitPose): its state dict (encoder.*, head.*), the
    pose kwargs of models.pose.build_pose, and the data normalisation it was trained with."""

    state_dict: dict[str, torch.Tensor]
    kwargs: dict
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stats_known: bool
    source: str
    extra: dict = field(default_factory=dict)  # what the run recorded besides: category_id, category


def read_pose(path: str | Path) -> PoseWeights | None:
    """The pose model a path holds (a `fastmae pose` run or checkpoint, a Hugging Face VitPose folder), or None
    when it holds another kind of model."""
    try:
        src = find_source(Path(path).expanduser())
    except FileNotFoundError:
        return None
    sd, config = read_file(src)
    if is_vitpose(sd):
        sd, kw = hf_vitpose_to_fastmae(sd, config)
        stats = _hf_stats(src) if src.is_dir() else None
    elif config.get("kind") == "pose" and isinstance(config.get("model_kwargs"), dict):
        kw = dict(config["model_kwargs"])
        stats = (config["mean"], config["std"]) if config.get("mean") and config.get("std") else None
    else:
        return None
    channels = int(kw["encoder"]["in_chans"])
    known = stats is not None and len(stats[0]) == channels and len(stats[1]) == channels
    mean, std = stats if known else default_stats(channels)
    extra = {k: config[k] for k in ("category_id", "category") if k in config}
    return PoseWeights(dict(sd), kw, tuple(map(float, mean)), tuple(map(float, std)), known, str(src), extra)
