"""The images inference runs on: files from any source the other commands read (a folder, class folders, a list
file, one image file), listed with their sizes from the headers (nothing decoded), and the name each is reported
under (its path relative to --data.path).

Shapes: N images, h, w an image's own size (the frame its EXIF orientation gives, unless told otherwise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.decode import UnreadableImageError, image_header, oriented_hw
from ..data.dense import ImageStore, warn_colour_dropped
from ..data.sources import IMAGE_EXTENSIONS, check_dir, find_images, folder_samples, read_list

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """The images to predict on: a store (paths and sizes), the name each is reported under, labels where the
    source has them (class folders, a labelled list; -1 otherwise), and the files left out (unreadable, with
    --data.skip_corrupt)."""

    store: ImageStore
    names: list[str]
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def report_name(file: Path, root: Path) -> str:
    """An image's name in the outputs: its path relative to root (POSIX), or the path as given when it lies
    elsewhere (a list file naming images outside its folder)."""
    try:
        rel = os.path.relpath(file, root)
    except ValueError:  # another drive
        return str(file)
    return str(file) if rel.startswith("..") else Path(rel).as_posix()


def source_files(source: str, path: str) -> tuple[list[Path], Path, list[int], list[str]]:
    """(files, the root names are relative to, labels (-1: none), class names) of a source: `path` one image file
    (any source), a folder searched recursively (unlabelled), class folders (folder), or a list file (list)."""
    p = Path(path).expanduser()
    if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS):
        return [p], p.parent, [-1], []
    if source == "unlabelled":
        root = check_dir(p, "--data.path")
        files = find_images(root)
        if not files:
            raise ValueError(f"no images found under {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}); "
                             f"pass `--data.path DIR` (or one image file) pointing at your images")
        return files, root, [-1] * len(files), []
    if source == "folder":
        root = check_dir(p, "--data.path")
        samples, classes = folder_samples(root, None)  # as the training commands list class folders
        return [Path(f) for f, _ in samples], root, [y for _, y in samples], classes
    if source == "list":
        entries = read_list(p)
        return [Path(f) for f, _ in entries], p.parent, [y for _, y in entries], []
    raise ValueError(f"--data.source {source} is not read by predict; use unlabelled (a folder or one image file), "
                     f"folder (class folders) or list (a list file)")


def image_set(files: Sequence[Path], root: Path, channels: int, *, labels: Sequence[int] = (),
              classes: Sequence[str] = (), max_image_pixels: int = 0, upright: bool = True,
              skip_corrupt: bool = False) -> ImageSet:
    """The files as an ImageSet: each one's size from its header (the upright frame unless upright is False). An
    unreadable or missing file stops here with one line naming it, or with skip_corrupt is left out, warned about
    and counted."""
    if not files:
        raise ValueError("no images to predict on")
    keep, sizes, kept_labels, skipped = [], [], [], []
    labels = list(labels) or [-1] * len(files)
    for f, y in zip(files, labels):
        try:
            if not os.path.isfile(f):
                raise UnreadableImageError(f"image {f} does not exist", "file does not exist")
            stored, orientation = image_header(f, max_image_pixels)
        except UnreadableImageError as e:
            if not skip_corrupt:
                raise
            skipped.append((str(f), e.reason or str(e)))
            log.warning("skipped unreadable image %s (--data.skip_corrupt): %s", f, e.reason or e)
            continue
        keep.append(Path(f))
        sizes.append(oriented_hw(stored, orientation, upright))
        kept_labels.append(y)
    if not keep:
        raise ValueError(f"none of the {len(files)} images could be read (first: {files[0]}); fix or replace them")
    warn_colour_dropped(keep, channels, root)
    store = ImageStore(keep, sizes, channels=channels, max_image_pixels=max_image_pixels, upright=upright)
    return ImageSet(store, [report_name(f, root) for f in keep], kept_labels, list(classes), skipped)


__all__ = ["ImageSet", "image_set", "report_name", "source_files"]
