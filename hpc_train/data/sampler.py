"""DistributedSampler: each rank's share of a global, per-epoch permutation."""

from __future__ import annotations

import numpy as np


class DistributedSampler:
    """Indices of this rank's samples for the current epoch.

    Every rank draws the same permutation from (seed, epoch) and takes every
    size-th index starting at its rank, so shares are disjoint and cover the set.
    All ranks get the same count (never a rank with one step fewer, which would
    hang a collective): `drop_last=True` drops the tail that does not divide
    evenly; otherwise the permutation is padded by wrapping around (PyTorch's rule).
    It also serves as the `sampler` of a torch DataLoader (`set_epoch` each epoch, as with
    torch's own DistributedSampler).
    """

    def __init__(self, n: int, rank: int, size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if n <= 0:
            raise ValueError(f"DistributedSampler: dataset has {n} samples")
        if not 0 <= rank < size:
            raise ValueError(f"DistributedSampler: rank {rank} not in [0, {size})")
        if drop_last and n < size:
            raise ValueError(f"DistributedSampler: {n} samples cannot give each of {size} ranks one")
        self.n, self.rank, self.size = n, rank, size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    @property
    def per_rank(self) -> int:
        return self.n // self.size if self.drop_last else -(-self.n // self.size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        total = self.per_rank * self.size
        if total > self.n:
            order = np.resize(order, total)  # wraps around: pads with the first indices
        return order[self.rank : total : self.size]

    def __iter__(self):
        return iter(self.indices().tolist())  # Python ints: what torch's DataLoader indexes datasets with

    def __len__(self) -> int:
        return self.per_rank
