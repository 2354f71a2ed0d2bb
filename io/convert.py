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


SEPARATOR = b"\0"  # between files of a text corpus: source code never holds it, so it marks "a new file"


def stdlib_folder() -> Path:
    """This Python's standard library sources: a text corpus on every machine (pin the Python
    version beside any figure trained on it)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def text_files(sources, pattern: str = "*.py") -> list[Path]:
    """The corpus's files, in a fixed order: each source a file, or a folder searched for `pattern`.
    Installed packages (site-packages, dist-packages) are left out: a corpus of the standard library
    is then the same for every machine with that Python version."""
    files = []
    for source in map(Path, sources):
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            files += sorted(p for p in source.rglob(pattern) if p.is_file() and not
                            {"site-packages", "dist-packages"} & set(p.relative_to(source).parts))
        else:
            raise DatasetError(f"{source}: no such file or folder")
    if not files:
        raise DatasetError(f"no {pattern} files under {', '.join(map(str, sources))}")
    return files


def byte_windows(files: list[Path], context: int) -> np.ndarray:
    """The files' bytes, joined by SEPARATOR, cut into (N, context + 1) uint8 windows that overlap by
    one byte, so every byte after the first is a next-byte target exactly once (a last partial
    window is dropped)."""
    if context < 1:
        raise DatasetError(f"context {context}: a window needs at least one input byte")
    stream = np.frombuffer(SEPARATOR.join(p.read_bytes() for p in files), np.uint8)
    count = (len(stream) - 1) // context
    if count == 0:
        raise DatasetError(f"{len(files)} files hold {len(stream)} bytes: too few for one window of "
                           f"{context + 1} bytes")
    windows = np.lib.stride_tricks.sliding_window_view(stream, context + 1)[::context][:count]
    return np.ascontiguousarray(windows)


def split_every(files: list[Path], every: int) -> tuple[list[Path], list[Path]]:
    """(training files, validation files): every `every`-th file held out whole (no window of a
    validation file is seen in training; `every` 0 holds none out)."""
    if every <= 0:
        return files, []
    held = set(range(every - 1, len(files), every))
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def read_digits():
    """scikit-learn's 8x8 handwritten digits (1797 images of 17 gray levels, 0-16; the UCI set's test
    part), as (images float32 (N, 8, 8, 1) scaled to [0, 1], labels int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("converting digits needs scikit-learn: pip install 'hpc_train[digits]'") from None
    digits = load_digits()
    return (digits.images / 16).astype(np.float32)[..., None], digits.target.astype(np.int64)


def held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices): a seeded random `fraction` of n samples held out."""
    if not 0 <= fraction < 1:
        raise DatasetError(f"validation fraction {fraction}: expected 0 <= fraction < 1")
    order = np.random.default_rng(seed).permutation(n)
    cut = n - round(n * fraction)
    return np.sort(order[:cut]), np.sort(order[cut:])
