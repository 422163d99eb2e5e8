"""Images -> normalised batches: Fashion-MNIST (IDX), class folders, unlabelled folders, list files, tar shards.

One file per concept: `transforms` (crop geometry, Pillow-equal bicubic resampling, normalisation),
`sources` (where samples come from), `decode` (Pillow, modes, bands, pixel limit), `sampler` (order and
sharding per (seed, epoch)), `loader` (the interface), `memory` / `files` (the indexable loaders), `shards` /
`stream` (tar shards: each epoch's plan, and the streaming loader), `build` (DataConfig -> loader).

Two paths, one sampler and one crop geometry (RandomResizedCrop for training, resize + centre crop at
0.875 for evaluation, both bicubic with Pillow's kernel and antialiasing when shrinking): in memory
(Fashion-MNIST, any uint8 tensor), each batch is cropped, resized and flipped at once by two batched
matrix products; files are decoded by Pillow in DataLoader workers and cropped and resized in one
`Image.resize(box=...)`. The order of an epoch comes from (seed, epoch) and each sample's augmentation
from (seed, epoch, its position), both computed in the main process, so `set_epoch(epoch, start_batch)`
replays exactly the batches of an uninterrupted run, whatever the number of workers. Tar shards are streamed
by workers that each read their own shards; their epoch, too, is a pure function of (seed, epoch), for a given
number of processes and workers. File and shard workers send 8-bit pixels as uint8, normalised on delivery.
"""

from .build import build_loader, eval_split_name, has_eval_split, holdout_indices
from .decode import UnreadableImageError, decode_image, load_image
from .files import FileLoader, ImageFiles
from .loader import Loader, SampledLoader
from .memory import MemoryLoader
from .sampler import EpochSampler
from .sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    find_images,
    load_fashion_mnist,
    read_idx,
    read_list,
)
from .transforms import (
    denormalize,
    eval_crop_box,
    normalize,
    resized_crop,
    sample_crop_box,
    sample_crop_boxes,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "EpochSampler",
    "FileLoader",
    "ImageFiles",
    "Loader",
    "SampledLoader",
    "MemoryLoader",
    "UnreadableImageError",
    "build_loader",
    "decode_image",
    "denormalize",
    "eval_crop_box",
    "eval_split_name",
    "find_images",
    "has_eval_split",
    "holdout_indices",
    "load_fashion_mnist",
    "load_image",
    "normalize",
    "read_idx",
    "read_list",
    "resized_crop",
    "sample_crop_box",
    "sample_crop_boxes",
]
