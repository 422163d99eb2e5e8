"""The loader interface every source shares: batches for one rank, epochs that resume at any batch."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from .decode import normalize_uint8
from .sampler import EpochSampler

log = logging.getLogger(__name__)


def check_norm(channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    """ValueError unless mean and std have one positive-std entry per channel."""
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise ValueError(f"--data.{name} has {len(values)} values but the model takes {channels} channel"
                             f"{'s' if channels != 1 else ''}; give one per channel")
    if any(s <= 0 for s in std):
        raise ValueError(f"--data.std must be positive, got {tuple(std)}")


def stack_images(images: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) of one batch's images: uint8 when all are 8-bit pixels (normalised where the batch lands), else
    float32 normalised (the 8-bit ones normalised here, as the others were when decoded)."""
    if all(x.dtype == torch.uint8 for x in images):
        return torch.stack(list(images))
    return torch.stack([normalize_uint8(x, mean, std) if x.dtype == torch.uint8 else x for x in images])


class Loader:
    """Iterable of (images (B, C, H, W) float32 normalised, on `device`, targets) for one rank: labels (B,) int64 (-1 =
    unlabelled), or what a task's head takes (label maps; a dict of tensors).

    The contract every source implements, in memory, from files or streamed: `len(loader)` is the batches per epoch
    on this rank; `set_epoch(epoch, start_batch)` before each epoch (as with DistributedSampler) selects the order
    and augmentation and the batch to start from, and a resumed epoch yields exactly the batches an uninterrupted run
    would; iteration yields the batches. The attributes say what the batches are (size, channels, normalisation,
    classes). Which samples a rank sees is the subclass's business (`SampledLoader`: indexable samples).
    """

    def __init__(
        self,
        *,
        img_size: tuple[int, int],
        batch_size: int,
        train: bool,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
        seed: int = 0,
        num_samples: int = 0,
        num_classes: int = 0,
        classes: Sequence[str] = (),
    ):
        check_norm(channels, mean, std)
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.batch_size = batch_size
        self.train = train
        self.channels = channels
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.crop_scale, self.hflip, self.seed = tuple(crop_scale), hflip, seed
        self.num_classes = num_classes
        self.classes = list(classes)
        self.num_samples = num_samples  # in the whole split (all ranks)
        self.skipped: list[str] = []
        self.epoch, self.start_batch = 0, 0
        self.device = torch.device("cpu")  # where batches are delivered (set_device)

    _loader = None  # the DataLoader of loaders with worker processes, made on first use
    _finalizer = None  # shuts those workers down when the loader is collected (weakref.finalize)

    def close(self) -> None:
        """Shut the loader's worker processes down now (also done when it is collected, and at exit); the next
        iteration starts new ones. Loaders without workers have none."""
        if self._finalizer is not None:
            self._finalizer()
        self._loader = self._finalizer = None

    def set_device(self, device: torch.device | str) -> None:
        """Deliver batches on `device`: loaders whose workers send uint8 pixels move them there (pinned memory,
        non_blocking) and normalise them there, a quarter of the bytes through the host."""
        self.device = torch.device(device)

    def deliver(self, images: torch.Tensor) -> torch.Tensor:
        """A batch as the workers sent it -> float32 normalised, on self.device for uint8 pixels (B, C, H, W)."""
        if images.dtype == torch.uint8:
            return normalize_uint8(images.to(self.device, non_blocking=True), self.mean, self.std)
        return images

    def require_classes(self, what: str) -> None:
        """ValueError unless the samples carry labels of two or more classes (`what` needs them, e.g. 'kNN')."""
        if self.num_classes == 0:
            raise ValueError(f"{what} needs labels: use a labelled source (fashion-mnist, folder, or a list with "
                             f"labels)")
        if self.num_classes == 1:
            name = f" ({self.classes[0]})" if self.classes else ""
            raise ValueError(f"{what} needs two or more classes, the data has one{name}: put each class's images in "
                             f"a sub-folder of its own (--data.source folder) or list their labels")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (order and augmentation) and the batch to start from for the next iterations."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(self)}]")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _note_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Record files a dataset skipped, warning once per file."""
        for path, reason in skipped:
            if path not in self.skipped:
                self.skipped.append(path)
                log.warning("skipped unreadable image %s (--data.skip_corrupt): %s", path, reason)


class SampledLoader(Loader):
    """A loader over N indexable samples (a tensor in memory, a list of files): `sampler` (EpochSampler) gives this
    rank's order and batches of every epoch as a pure function of (seed, epoch)."""

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, drop_last: bool | None = None, **kw):
        super().__init__(num_samples=num_samples, **kw)
        self.sampler = EpochSampler(
            num_samples, self.batch_size, shuffle=self.train, seed=self.seed, rank=rank, world_size=world_size,
            drop_last=self.train if drop_last is None else drop_last,
        )

    def __len__(self) -> int:
        return self.sampler.num_batches
