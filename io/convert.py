"""Converters into the dataset layout: CIFAR-10 binary (no pickle) and .npz arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .hdf5 import DatasetError

CIFAR_RECORD = 1 + 32 * 32 * 3  # a label byte, then 1024 red, 1024 green, 1024 blue pixel bytes


def read_cifar10_binary(directory, split: str = "train"):
    """(images uint8 NHWC, labels int64, class names or None) from CIFAR-10's binary files."""
    directory = Path(directory)
    names = sorted(directory.glob("data_batch_*.bin")) if split == "train" else [directory / "test_batch.bin"]
    if not names or not all(p.is_file() for p in names):
        raise DatasetError(f"{directory}: no CIFAR-10 binary {split} files "
                           f"({'data_batch_*.bin' if split == 'train' else 'test_batch.bin'})")
    images, labels = [], []
    for path in names:
        raw = np.fromfile(path, np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise DatasetError(f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte "
                               "CIFAR-10 records")
        records = raw.reshape(-1, CIFAR_RECORD)
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    meta = directory / "batches.meta.txt"
    classes = [line.strip() for line in meta.read_text().splitlines() if line.strip()] if meta.is_file() else None
    labels = np.concatenate(labels)
    if labels.max() > 9:
        bad = int(np.flatnonzero(labels > 9)[0])
        raise DatasetError(f"{directory}: record {bad} has label {int(labels[bad])}, CIFAR-10 labels are 0-9")
    return np.ascontiguousarray(np.concatenate(images)), labels, classes


def read_npz(path, images_key: str = "images", labels_key: str = "labels"):
    """(images, labels) from an .npz file (loaded without pickle)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read as .npz ({exc})") from None
    with archive:
        for key in (images_key, labels_key):
            if key not in archive:
                raise DatasetError(f"{path}: array '{key}' is missing (found: {sorted(archive.files)})")
        images, labels = archive[images_key], archive[labels_key]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: array '{labels_key}' must be 1-D integers, is {labels.dtype} {labels.shape}")
    return images, labels.astype(np.int64)
