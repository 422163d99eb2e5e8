"""Which samples each rank sees, in which order: a pure function of (seed, epoch), so resume is exact."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from (seed, epoch, stream): well spread even for neighbouring inputs."""
    state = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


ORDER_STREAM, AUGMENT_STREAM = 0, 1  # independent random streams per epoch


class EpochSampler:
    """DistributedSampler's split of an epoch into batches for one rank, as a pure function of the epoch.

    The order (shuffled from (seed, epoch) when `shuffle`) is padded by wrapping around to a
    multiple of world_size; rank r takes positions r, r + world_size, ...; `drop_last` drops the
    rank's incomplete last batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
    ):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(num_samples / world_size)
        self.total = self.per_rank * world_size  # padded epoch length over all ranks
        if drop_last and self.per_rank < batch_size:
            log.warning(
                "only %d samples per rank, fewer than the batch size %d: keeping the partial batch "
                "(lower the batch size to silence this)", self.per_rank, batch_size,
            )
            drop_last = False
        self.num_batches = self.per_rank // batch_size if drop_last else math.ceil(self.per_rank / batch_size)

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, positions): this rank's sample indices for the epoch, in order, and their global positions."""
        n = self.num_samples
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, ORDER_STREAM))
            order = torch.randperm(n, generator=g)  # (N,)
        else:
            order = torch.arange(n)
        order = order.repeat(math.ceil(self.total / n))[: self.total]  # (total,), padded by wrapping around
        positions = torch.arange(self.rank, self.total, self.world_size)[: self.num_batches * self.batch_size]
        return order[positions], positions

    def batch_slices(self, start_batch: int = 0) -> Iterator[slice]:
        """Slices of `order()` output, one per batch, from start_batch on."""
        for b in range(start_batch, self.num_batches):
            yield slice(b * self.batch_size, (b + 1) * self.batch_size)
