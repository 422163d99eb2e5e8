"""Reading and writing weight files: safetensors or torch.load(weights_only=True), Hugging Face folders
(single or sharded), fastmae exports (X.safetensors + X.json), timm and official files; all writes atomic."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write, read_training_file, safe_join
from .formats import StateDict, unwrap_state_dict
from .hf import cfg_dict


def _load_weights(path: Path) -> StateDict:
    """One weights file: .safetensors via safetensors, anything else via torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors' SafetensorError (a corrupt or oversized header), OSError
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be "
                             f"truncated or not a safetensors file at all: download or convert it again") from None
        return unwrap_state_dict(sd)
    return unwrap_state_dict(read_training_file(path))  # a sharded run's checkpoint: its whole model


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, or a ValueError naming the file (not JSON, or not an object)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it should be the {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; it should be the {what}")
    return data


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _load_hf_dir(path: Path) -> tuple[StateDict, dict]:
    """A Hugging Face model folder: its weights (single or sharded) and parsed config.json."""
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is a folder without config.json; expected a Hugging Face model folder")
    config = _read_json(path / "config.json", "Hugging Face model config")
    for name in HF_WEIGHT_FILES:
        f = path / name
        if f.exists():
            if name.endswith(".index.json"):
                index = _read_json(f, "shard index")
                if not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
                    raise ValueError(f"{f} has no 'weight_map' (tensor name -> shard file); the index is damaged")
                shards = sorted(set(map(str, index["weight_map"].values())))
                sd: StateDict = {}
                for shard in shards:  # names from a downloaded file: never outside the folder
                    sd.update(_load_weights(safe_join(path, shard, what=f"shard named in {f}")))
                return sd, config
            return _load_weights(f), config
    raise FileNotFoundError(f"{path} has config.json but no weights ({', '.join(HF_WEIGHT_FILES)})")


def read_file(path: str | Path) -> tuple[StateDict, dict]:
    """(state dict, config): config.json of a Hugging Face folder, the .json beside a fastmae file, or {}."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        return _load_hf_dir(p)
    sd = _load_weights(p)
    side = p.with_suffix(".json")
    meta = check_meta(_read_json(side, f"metadata of {p.name}"), side) if side.is_file() else {}
    return sd, meta


# Integer sizes a fastmae metadata file's model_kwargs may hold, and every key it may hold.
SIZE_KEYS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
             "decoder_num_heads", "num_classes")


def _known_kwargs() -> set[str]:
    import inspect

    from ...models.mae import MaskedAutoencoderViT
    from ...models.vit import VisionTransformer

    return {n for cls in (MaskedAutoencoderViT, VisionTransformer) for n in inspect.signature(cls).parameters}


def check_meta(meta: dict, path: Path) -> dict:
    """The metadata beside a fastmae checkpoint, checked field by field: a ValueError naming the file, the field
    and the fix for a wrong type, an unknown constructor argument or a size that is not a whole number."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"{path} (the checkpoint's metadata) {problem}; restore it from the run that wrote it, or "
                          f"delete it to read the weights alone (sizes are then inferred from the weights)")

    for key, typ in (("kind", str), ("config", dict), ("model_kwargs", dict)):
        if key in meta and not isinstance(meta[key], typ):
            raise bad(f"has {key!r} as a JSON {type(meta[key]).__name__}, not a{'n object' if typ is dict else ' string'}")
    for key in ("mean", "std"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)):
            raise bad(f"has {key!r} = {v!r}, not a list of numbers")
    kw = meta.get("model_kwargs") or {}
    if isinstance(kw.get("encoder"), dict):  # a dense-task model (segment, detect): its encoder's kwargs
        kw = kw["encoder"]
    elif meta.get("kind") in ("mae", "vit", "encoder"):
        unknown = sorted(set(kw) - _known_kwargs())
        if unknown:
            raise bad(f"names model_kwargs fastmae's models do not take: {', '.join(unknown)}")
    for key in SIZE_KEYS:
        v = kw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise bad(f"has model_kwargs {key} = {v!r}, not a whole number")
    return meta


def _save_safetensors(path: Path, sd: Mapping[str, torch.Tensor]) -> Path:
    """safetensors file, atomically; metadata format=pt as transformers' from_pretrained requires."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _save_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_fastmae(path_without_ext: str | Path, sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
                 ) -> Path:
    """Write X.safetensors and X.json (meta with 'kind' and 'model_kwargs'); returns the .safetensors path. Kinds:
    'mae', 'vit', 'encoder', and 'pose' (a whole pose model: encoder and head)."""
    if meta.get("kind") not in ("mae", "vit", "encoder", "pose") or not isinstance(meta.get("model_kwargs"), Mapping):
        raise ValueError("meta needs 'kind' ('mae', 'vit', 'encoder' or 'pose') and 'model_kwargs' (a dict)")
    base = Path(path_without_ext)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    out = _save_safetensors(base.with_name(base.name + ".safetensors"), sd)
    _save_text(base.with_name(base.name + ".json"), json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")
    return out


def save_hf(directory: str | Path, hf_sd: Mapping[str, torch.Tensor], hf_config,
            preprocessor: Mapping[str, Any] | None = None) -> Path:
    """A Hugging Face model folder: config.json + model.safetensors (keys written as given: pass
    style='legacy' state dicts so that every transformers version loads them), and
    preprocessor_config.json when `preprocessor` is given (see hf_preprocessor_config)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{d} exists and is not a folder; a Hugging Face model is a folder")
    _save_safetensors(d / "model.safetensors", hf_sd)
    _save_text(d / "config.json", json.dumps(cfg_dict(hf_config), indent=2, sort_keys=True) + "\n")
    if preprocessor:
        _save_text(d / HF_PREPROCESSOR, json.dumps(dict(preprocessor), indent=2, sort_keys=True) + "\n")
    return d


HF_PREPROCESSOR = "preprocessor_config.json"


def hf_preprocessor_config(img_size, mean, std) -> dict:
    """A ViTImageProcessor config with the model's data normalisation (bicubic resize to img_size)."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": H, "width": W},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(m) for m in mean], "image_std": [float(s) for s in std]}


def save_timm(path: str | Path, sd: Mapping[str, torch.Tensor]) -> Path:
    """Weights only: a .safetensors file, or a .pth/.pt/.bin state dict (torch.save)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return _save_safetensors(p, sd)
    if p.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"timm output must end in .safetensors, .pth, .pt or .bin, got {p.name}")
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    return atomic_write(p, lambda tmp: torch.save(tensors, tmp))


def save_official(path: str | Path, sd: Mapping[str, torch.Tensor]) -> Path:
    """An official-style checkpoint: {'model': state_dict} in a .pth (loads with weights_only=True)."""
    p = Path(path)
    if p.suffix not in (".pth", ".pt"):
        raise ValueError(f"official output must end in .pth or .pt, got {p.name}")
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    return atomic_write(p, lambda tmp: torch.save({"model": tensors}, tmp))
