"""In-memory loader: batches of (images, labels) for this rank, one epoch per pass.

The interface the parallel-HDF5 loader keeps: iterate for an epoch, `set_epoch`
to choose one, `len()` batches per epoch, identical on every rank, `max_batches`
to end a pass early, `close()`.
"""

from __future__ import annotations

import numpy as np

from .sampler import DistributedSampler


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1]; other dtypes are taken as already scaled."""
    if images.dtype != np.uint8:
        return images.astype(np.float32, copy=False)
    return images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


class ArrayLoader:
    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, sampler: DistributedSampler,
                 transform=to_float):
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.sampler, self.transform = sampler, transform
        self._passes = 0
        self._epoch_set = False
        self.max_batches: int | None = None  # batches per pass, if fewer than a whole epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._epoch_set = True

    def __len__(self) -> int:
        whole = -(-len(self.sampler) // self.batch_size)
        return whole if self.max_batches is None else min(whole, self.max_batches)

    def __iter__(self):
        if self._passes and not self._epoch_set:  # a new pass without set_epoch: the next epoch
            self.sampler.set_epoch(self.sampler.epoch + 1)
        self._passes += 1
        self._epoch_set = False
        indices = self.sampler.indices()
        for lo in range(0, min(len(indices), len(self) * self.batch_size), self.batch_size):
            batch = indices[lo : lo + self.batch_size]
            yield self.transform(self.images[batch]), self.labels[batch]

    def close(self) -> None:
        """Nothing to release (the arrays are the caller's); here for the loader interface."""
