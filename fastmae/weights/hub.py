"""Released MAE checkpoints by name, like the official demo's `prepare_model`: name -> URL -> one cached file.

`fastmae.load("mae_visualize_vit_large")` and every `--init mae_pretrain_vit_base` go through `fetch`: the
file is downloaded once into the cache (`$FASTMAE_CACHE`, default `~/.cache/fastmae`), written to a temporary
name and renamed only when complete (its size checked against Content-Length, its sha256 against the table
where one is recorded), then read from there. Without network the error says which file to put where.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .checkpoint import atomic_write

BASE_URL = "https://dl.fbaipublicfiles.com/mae"
CHUNK = 1 << 20  # bytes read per step of the download
TIMEOUT_S = 60.0  # seconds a stalled connection waits before failing
STALE_DOWNLOAD_S = 600.0  # a download's temporary file untouched this long belongs to a killed process


@dataclass(frozen=True)
class Release:
    """One released file: where it is, what it holds, and what its weights do not record."""

    url: str
    holds: Literal["mae", "encoder", "classifier"]  # mae = encoder + decoder
    norm_pix_loss: bool | None = None  # the pixel target of its decoder (None: no decoder)
    sha256: str | None = None  # None: not published; only the size is checked
    size: int | None = None  # bytes, where known; else the server's Content-Length is the check


def _releases() -> dict[str, Release]:
    """The official release (facebookresearch/mae README, demo notebook and issues #3/#8).

    *_full.pth decoders were trained on per-patch normalised pixels ("these models reconstruct normalized
    pixels", issue #8); the visualize files were trained for the demo on raw pixels (large_ganloss adds a GAN
    loss). No sha256 is published for any of them.
    """
    table: dict[str, Release] = {}
    for size in ("base", "large", "huge"):
        table[f"mae_pretrain_vit_{size}"] = Release(f"{BASE_URL}/pretrain/mae_pretrain_vit_{size}.pth", "encoder")
        table[f"mae_pretrain_vit_{size}_full"] = Release(
            f"{BASE_URL}/pretrain/mae_pretrain_vit_{size}_full.pth", "mae", norm_pix_loss=True)
        table[f"mae_finetuned_vit_{size}"] = Release(f"{BASE_URL}/finetune/mae_finetuned_vit_{size}.pth", "classifier")
        table[f"mae_visualize_vit_{size}"] = Release(
            f"{BASE_URL}/visualize/mae_visualize_vit_{size}.pth", "mae", norm_pix_loss=False)
    table["mae_visualize_vit_large_ganloss"] = Release(
        f"{BASE_URL}/visualize/mae_visualize_vit_large_ganloss.pth", "mae", norm_pix_loss=False)
    return table


RELEASES: dict[str, Release] = _releases()
OFFICIAL_NAME = re.compile(r"^mae_(pretrain|visualize|finetuned?)_vit_")


def cache_dir() -> Path:
    """Where downloads go: $FASTMAE_CACHE, else ~/.cache/fastmae."""
    return Path(os.environ.get("FASTMAE_CACHE") or "~/.cache/fastmae").expanduser()


def release_name(text: str | Path) -> str | None:
    """The release a bare name or file name means ('mae_pretrain_vit_base' or '...base.pth'), else None."""
    name = Path(str(text)).name
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    return name if name in RELEASES else None


def is_bare_name(text: str | Path) -> bool:
    """True for a name without folders (what a release name looks like on the command line)."""
    return "/" not in str(text) and os.sep not in str(text)


def looks_official(text: str | Path) -> bool:
    """Names shaped like the official files (mae_pretrain_vit_*, mae_visualize_vit_*, mae_finetuned_vit_*)."""
    return bool(OFFICIAL_NAME.match(Path(str(text)).name))


def unknown_name_error(text: str | Path) -> FileNotFoundError:
    """The error for a path that does not exist but looks like an official name: the known names."""
    return FileNotFoundError(f"{text} is neither a file nor a released checkpoint; known names: "
                             f"{', '.join(sorted(RELEASES))}")


def fetch(name: str, progress: bool = True) -> Path:
    """The cached file of a release, downloaded first if it is not in the cache yet."""
    key = release_name(name)
    if key is None:
        raise unknown_name_error(name)
    rel = RELEASES[key]
    folder = cache_dir()
    dest = folder / f"{key}.pth"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the download cache {folder} ($FASTMAE_CACHE) is a file, not a folder; set "
                                 f"FASTMAE_CACHE to a folder, or pass --init PATH to a local copy of {key}.pth")
    if dest.exists():
        return dest
    remove_stale_downloads(folder, dest.name)
    try:
        return download(rel.url, dest, size=rel.size, sha256=rel.sha256, progress=progress)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise FileNotFoundError(
            f"could not download {key} from {rel.url} ({type(e).__name__}: {reason}); put {key}.pth in "
            f"{dest.parent}/ or pass --init PATH") from None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise PermissionError(f"cannot write the download cache {folder} ({e.strerror}); set FASTMAE_CACHE to a "
                              f"folder you can write, or pass --init PATH to a local copy of {key}.pth") from None


def remove_stale_downloads(folder: Path, name: str) -> list[Path]:
    """Remove the temporary files of downloads of `name` that a killed process left (SIGKILL, power loss): untouched
    for STALE_DOWNLOAD_S, so a download still running in another process keeps its file. Returns those removed."""
    removed = []
    for tmp in folder.glob(f".{name}.*.tmp") if folder.is_dir() else ():
        try:
            if time.time() - tmp.stat().st_mtime > STALE_DOWNLOAD_S:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass
    return removed


def download(url: str, dest: Path, size: int | None = None, sha256: str | None = None,
             progress: bool = True) -> Path:
    """Stream `url` into `dest` atomically (temp file + rename); refuse a short or mismatching file.

    The byte bar shows on a terminal only (tqdm disable=None), so a redirected log gets no carriage returns.
    """
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if size is not None and length is not None and length != size:
            raise ValueError(f"{url} is {length} bytes but the release table says {size}; not using it")
        expect = size if size is not None else length
        digest = hashlib.sha256()

        def write(tmp: Path) -> None:
            got = 0
            with open(tmp, "wb") as f, tqdm(total=expect, unit="B", unit_scale=True, desc=dest.name,
                                            disable=None if progress else True, leave=False) as bar:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if expect is not None and got != expect:
                raise ConnectionError(f"download of {url} stopped after {got} of {expect} bytes")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ValueError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; not using it")

        return atomic_write(dest, write, disk_full_fix=f"free space, or set FASTMAE_CACHE to a folder on a disk "
                                                       f"with room (or pass --init PATH to a local copy)")


__all__ = ["RELEASES", "Release", "cache_dir", "download", "fetch", "looks_official", "release_name"]
