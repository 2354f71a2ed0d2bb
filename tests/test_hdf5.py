"""Parallel HDF5 datasets: reads equal serial reads; bad files fail on every rank (mpirun, 1/2/4 ranks)."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from hpc_train.io.hdf5 import DatasetError, write_arrays

import hpc_train as ht
from hpc_train.data import DistributedSampler, HDF5Loader

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture
def shared_dir(comm, tmp_path_factory):
    """One directory every rank sees (rank 0's)."""
    return comm.bcast(str(tmp_path_factory.mktemp("h5")) if comm.Get_rank() == 0 else None, root=0)


def sample_arrays(n=123):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8), rng.integers(0, 7, n)


@pytest.mark.parametrize("contiguous", [False, True], ids=["chunked", "contiguous"])
@pytest.mark.parametrize("collective", [True, False], ids=["collective", "independent"])
def test_reads_equal_serial_reads(comm, shared_dir, contiguous, collective):
    images, labels = sample_arrays()
    path = os.path.join(shared_dir, f"d-{contiguous}-{collective}.h5")
    write_arrays(path, images, labels, comm, classes=7, chunk_bytes=600, contiguous=contiguous)
    with h5py.File(path, "r") as f:  # the serial reference, on every rank
        assert (f["images"].chunks is None) == contiguous
        np.testing.assert_array_equal(f["images"][...], images)
    with HDF5Loader(path, 10, collective=collective, transform=lambda a: a, seed=4) as loader:
        seen = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            order = loader.sampler.indices()
            got = list(loader)
            assert len(got) == len(loader) == -(-len(order) // 10)
            x = np.concatenate([b[0] for b in got])
            y = np.concatenate([b[1] for b in got])
            np.testing.assert_array_equal(x, images[order])  # sampler order, not sorted order
            np.testing.assert_array_equal(y, labels[order])
            seen.append(order)
        everyone = np.concatenate(comm.allgather(seen[0]))
        assert set(everyone) == set(range(len(images)))
        # unsorted, duplicated and empty requests (a rank may have nothing in a batch)
        ask = np.array([5, 3, 3, 120, 4]) if comm.Get_rank() % 2 == 0 else np.array([], dtype=np.int64)
        x, y = loader.read(ask)
        np.testing.assert_array_equal(x, images[ask])
        np.testing.assert_array_equal(y, labels[ask])


def test_fewer_samples_than_ranks_and_early_stop(comm, shared_dir):
    images, labels = sample_arrays(2)
    path = os.path.join(shared_dir, "tiny.h5")
    write_arrays(path, images, labels, comm)
    with HDF5Loader(path, 1, transform=lambda a: a) as loader:
        batches = list(loader)  # padded by wrapping: every rank gets the same count, even with 4 ranks
        order = loader.sampler.indices()
        assert len(batches) == len(loader) == len(order) == -(-2 // comm.Get_size())
        np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images[order])
    big_images, big_labels = sample_arrays(200)
    path = os.path.join(shared_dir, "early.h5")
    write_arrays(path, big_images, big_labels, comm)
    with HDF5Loader(path, 4, transform=lambda a: a, prefetch=1) as loader:
        for i, _ in enumerate(loader):  # leaving early must not strand other ranks in a collective read
            if i == 2:
                break
        loader.max_batches = 3
        assert len(list(loader)) == 3


def test_sampler_of_the_caller_is_used(comm, shared_dir):
    images, labels = sample_arrays(40)
    path = os.path.join(shared_dir, "sampler.h5")
    write_arrays(path, images, labels, comm)
    sampler = DistributedSampler(40, comm.Get_rank(), comm.Get_size(), shuffle=False)
    with HDF5Loader(path, 7, sampler, transform=lambda a: a) as loader:
        y = np.concatenate([b[1] for b in loader])
    np.testing.assert_array_equal(y, labels[sampler.indices()])


def broken_files(shared_dir, comm):
    """name -> (path, expected message), written by rank 0."""
    d = shared_dir
    cases = {
        "missing": (os.path.join(d, "nope.h5"), "cannot open as HDF5"),
        "not-hdf5": (os.path.join(d, "text.h5"), "cannot open as HDF5"),
        "truncated": (os.path.join(d, "truncated.h5"), "cannot open as HDF5"),
        "no-labels": (os.path.join(d, "nolabels.h5"), "dataset 'labels' is missing"),
        "length": (os.path.join(d, "length.h5"), "dataset 'images' has 10 samples but 'labels' has 9"),
        "dtype": (os.path.join(d, "dtype.h5"), "dataset 'labels' must hold integers, has dtype float32"),
        "range": (os.path.join(d, "range.h5"), "dataset 'labels' value 12 at index 3 is outside [0, 10)"),
    }
    if comm.Get_rank() == 0:
        with open(cases["not-hdf5"][0], "w") as f:
            f.write("images,labels\n")
        images = np.zeros((10, 2, 2, 3), np.uint8)
        with h5py.File(cases["truncated"][0], "w") as f:
            f["images"] = np.zeros((1000, 8, 8, 3), np.uint8)
            f["labels"] = np.zeros(1000, np.int64)
        os.truncate(cases["truncated"][0], os.path.getsize(cases["truncated"][0]) // 2)
        with h5py.File(cases["no-labels"][0], "w") as f:
            f["images"] = images
        with h5py.File(cases["length"][0], "w") as f:
            f["images"], f["labels"] = images, np.zeros(9, np.int64)
        with h5py.File(cases["dtype"][0], "w") as f:
            f["images"], f["labels"] = images, np.zeros(10, np.float32)
        with h5py.File(cases["range"][0], "w") as f:
            f["images"], f["labels"] = images, np.array([0, 1, 2, 12, 0, 0, 0, 0, 0, 0])
            f.attrs["classes"] = 10
    comm.Barrier()
    return cases


def test_bad_files_raise_dataset_error_on_every_rank(comm, shared_dir):
    for name, (path, message) in broken_files(shared_dir, comm).items():
        with pytest.raises(DatasetError) as info:
            HDF5Loader(path, 4)
        assert path in str(info.value) and message in str(info.value), (name, str(info.value))
        comm.Barrier()  # nobody hung
    assert ht.size() == comm.Get_size()


def test_device_option(comm, shared_dir):
    images, labels = sample_arrays(20)
    path = os.path.join(shared_dir, "device.h5")
    write_arrays(path, images, labels, comm)
    with pytest.raises(ValueError, match="device 'tpu'"):
        HDF5Loader(path, 4, device="tpu")
    from hpc_train.backend import cupy_module

    if cupy_module() is not None:
        pytest.skip("cupy installed: the GPU path is exercised on GPU machines only")
    with HDF5Loader(path, 4, device="cuda") as loader, pytest.raises(RuntimeError, match="needs cupy"):
        next(iter(loader))  # the prefetch thread's error reaches the consumer, on every rank


def test_token_windows_read_as_inputs_and_next_token_targets(comm, shared_dir):
    tokens = np.random.default_rng(5).integers(0, 50, (37, 9)).astype(np.int16)
    path = os.path.join(shared_dir, "tokens.h5")
    write_arrays(path, tokens, None, comm, classes=50, chunk_bytes=64)
    with HDF5Loader(path, 5, seed=2) as loader:
        assert (loader.layout, loader.input_shape, loader.classes, loader.labels) == ("tokens", (8,), 50, None)
        order = loader.sampler.indices()
        got = list(loader)
        inputs = np.concatenate([b[0] for b in got])
        targets = np.concatenate([b[1] for b in got])
        np.testing.assert_array_equal(inputs, tokens[order, :-1])  # as stored: no float transform
        np.testing.assert_array_equal(targets, tokens[order, 1:])
        assert inputs.dtype == np.int16
    bad = tokens.copy()
    bad[30, 4] = 50
    write_arrays(path, bad, None, comm, classes=50)
    with HDF5Loader(path, 5, seed=2) as loader, pytest.raises(DatasetError, match="tokens.h5: dataset 'tokens' "
                                                                   "window 30 holds 50 at position 4, outside "
                                                                   r"the vocabulary \[0, 50\)"):
        loader.read(np.array([2, 30]))


def test_a_token_file_without_its_vocabulary_is_refused_on_every_rank(comm, shared_dir):
    path = os.path.join(shared_dir, "novocab.h5")
    if comm.Get_rank() == 0:
        with h5py.File(path, "w") as f:
            f["tokens"] = np.zeros((4, 3), np.uint8)
    comm.Barrier()
    with pytest.raises(DatasetError, match="attribute 'classes' .the vocabulary size of dataset 'tokens'. is missing"):
        HDF5Loader(path, 2)


def test_loaders_dropped_without_close_release_their_files(comm, shared_dir):
    import gc

    images, labels = sample_arrays(40)
    path = os.path.join(shared_dir, "dropped.h5")
    write_arrays(path, images, labels, comm)
    for _ in range(3):
        loader = HDF5Loader(path, 4)  # rebinding drops the previous loader, datasets open, without close()
        next(iter(loader))
    del loader
    gc.collect()
    write_arrays(path, images[:8], labels[:8], comm)  # HDF5 refuses to recreate a file it still has open
    with HDF5Loader(path, 4) as again:
        assert again.n == 8
