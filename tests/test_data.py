"""DistributedSampler, the in-memory loader and the synthetic dataset (serial)."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_train.data import ArrayLoader, DistributedSampler, synthetic_classification


@pytest.mark.parametrize("n, size", [(10, 4), (12, 4), (3, 4), (1000, 3)])
def test_sampler_shares_cover_the_set_equally(n, size):
    shares = [DistributedSampler(n, r, size, seed=5).indices() for r in range(size)]
    assert len({len(s) for s in shares}) == 1  # every rank the same number of samples
    together = np.concatenate(shares)
    assert set(together) == set(range(n))
    assert len(together) - n < size  # padding only to even out the last round


def test_sampler_drop_last_and_epochs():
    shares = [DistributedSampler(10, r, 4, drop_last=True).indices() for r in range(4)]
    assert [len(s) for s in shares] == [2, 2, 2, 2] and len(set(np.concatenate(shares))) == 8
    sampler = DistributedSampler(100, 0, 2, seed=1)
    first = sampler.indices()
    sampler.set_epoch(1)
    assert not np.array_equal(first, sampler.indices())
    sampler.set_epoch(0)
    np.testing.assert_array_equal(first, sampler.indices())  # (seed, epoch) decides, nothing else
    np.testing.assert_array_equal(DistributedSampler(7, 1, 2, shuffle=False).indices(), [1, 3, 5, 0])
    with pytest.raises(ValueError, match="rank 2"):
        DistributedSampler(10, 2, 2)


def test_loader_passes_are_epochs():
    images = np.arange(20, dtype=np.uint8).reshape(20, 1)
    labels = np.arange(20)
    loader = ArrayLoader(images, labels, 3, DistributedSampler(20, 0, 2, seed=3))
    assert len(loader) == 4
    first = np.concatenate([y for _, y in loader])
    second = np.concatenate([y for _, y in loader])
    assert sorted(first) != sorted(second) or not np.array_equal(first, second)
    assert loader.sampler.epoch == 1
    loader.set_epoch(0)
    np.testing.assert_array_equal(np.concatenate([y for _, y in loader]), first)
    x, y = next(iter(loader))
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose((x[:, 0] + 1) * 255 / 2, y, atol=1e-4)  # images follow their labels


def test_synthetic_is_deterministic_and_sliceable():
    images, labels = synthetic_classification(50, seed=4)
    tail_images, tail_labels = synthetic_classification(20, seed=4, start=30)
    np.testing.assert_array_equal(images[30:], tail_images)
    np.testing.assert_array_equal(labels[30:], tail_labels)
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8
    assert set(np.unique(synthetic_classification(400, seed=4)[1])) == set(range(10))
