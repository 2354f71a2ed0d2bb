"""Latency statistics the way fio keeps them: a log-linear histogram, percentiles, bandwidth samples.

fio (stat.c) stores every completion latency in a histogram with 64 linear
buckets per power of two (FIO_IO_U_PLAT_BITS = 6): values below 128 ns are exact,
larger ones have a relative error under 1/64 (~0.8%). Percentile p is the first
bucket whose cumulative count reaches p/100 of all samples, reported as that
bucket's midpoint. We do the same, so our percentiles match fio's to the bucket.
"""

from __future__ import annotations

import numpy as np

PLAT_BITS = 6
PLAT_VAL = 1 << PLAT_BITS


def bucket_index(values_ns: np.ndarray) -> np.ndarray:
    """fio's plat_val_to_idx for an array of non-negative integer nanoseconds."""
    v = np.asarray(values_ns, dtype=np.int64)
    msb = np.zeros(v.shape, np.int64)
    big = v >= 2 * PLAT_VAL
    msb[big] = np.floor(np.log2(v[big])).astype(np.int64)
    # log2 of a float can be off by one right at powers of two: correct against the integer value
    msb[big] += (v[big] >> (msb[big] + 1)) > 0
    msb[big] -= (v[big] >> msb[big]) == 0
    error_bits = msb - PLAT_BITS
    index = np.where(big, ((error_bits + 1) << PLAT_BITS) + ((v >> np.maximum(error_bits, 0)) & (PLAT_VAL - 1)), v)
    return index


def bucket_value(index: np.ndarray) -> np.ndarray:
    """fio's plat_idx_to_val: the midpoint of each bucket, in ns."""
    index = np.asarray(index, dtype=np.int64)
    error_bits = (index >> PLAT_BITS) - 1
    base = np.left_shift(1, np.maximum(error_bits, 0) + PLAT_BITS)
    k = index % PLAT_VAL
    mid = base + (k + 0.5) * np.left_shift(1, np.maximum(error_bits, 0))
    return np.where(index < 2 * PLAT_VAL, index, mid.astype(np.int64))


def histogram_bins(latencies_ns: np.ndarray) -> dict:
    """json+'s bins: {"value of the bucket in ns": I/Os} for every bucket that has any."""
    index, counts = np.unique(bucket_index(latencies_ns), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(bucket_value(index), counts, strict=True)}


def percentiles(latencies_ns: np.ndarray, wanted) -> dict:
    """{"99.000000": ns, ...} from the histogram, as fio prints them."""
    if len(latencies_ns) == 0:
        return {}
    counts = np.bincount(bucket_index(latencies_ns))
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    out = {}
    for p in wanted:
        index = int(np.searchsorted(cumulative, p / 100.0 * total, side="left"))
        out[f"{p:.6f}"] = int(bucket_value(np.array([min(index, len(counts) - 1)]))[0])
    return out


def summary(values: np.ndarray) -> dict:
    """fio's {min, max, mean, stddev, N} (sample standard deviation, 0 for fewer than 2)."""
    n = len(values)
    if n == 0:
        return {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    return {"min": int(values.min()), "max": int(values.max()), "mean": float(values.mean()),
            "stddev": float(values.std(ddof=1)) if n > 1 else 0.0, "N": int(n)}


def latency_distribution(latencies_ns: np.ndarray) -> tuple[dict, dict, dict]:
    """fio's latency_ns / latency_us / latency_ms: percent of I/Os per bucket (upper bounds)."""
    n = max(len(latencies_ns), 1)
    bounds = (2, 4, 10, 20, 50, 100, 250, 500, 750, 1000)
    tables = []
    for scale, extra in ((1, ()), (1_000, ()), (1_000_000, (2000,))):
        table, low = {}, 0 if scale == 1 else bounds[-1] * scale // 1000
        for bound in bounds + extra:
            high = bound * scale
            table[str(bound)] = 100.0 * int(np.count_nonzero((latencies_ns >= low) & (latencies_ns < high))) / n
            low = high
        if scale == 1_000_000:
            table[">=2000"] = 100.0 * int(np.count_nonzero(latencies_ns >= low)) / n
        tables.append(table)
    return tuple(tables)


def windowed_rates(completions_s: np.ndarray, sizes: np.ndarray, window_s: float = 0.5):
    """Bandwidth (KiB/s) and IOPS per window of window_s (fio samples every 500 ms)."""
    if len(completions_s) == 0:
        return np.zeros(0), np.zeros(0)
    bins = (completions_s // window_s).astype(np.int64)
    full = bins < bins.max()  # the last window is partial: fio drops it too
    count = np.bincount(bins[full])
    nbytes = np.bincount(bins[full], weights=sizes[full])
    return nbytes / 1024.0 / window_s, count / window_s


def _shares(values: np.ndarray, edges: list[int], labels: list[str]) -> dict:
    """% of values per bucket (bucket k holds edges[k-1] < v <= edges[k]); fio shows a tiny
    non-zero share as 0.1 rather than 0."""
    values = np.asarray(values, np.int64)
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(labels))[: len(labels)]
    total = max(len(values), 1)
    return {label: (max(0.1, 100.0 * c / total) if c else 0.0)
            for label, c in zip(labels, counts.tolist(), strict=True)}


def depth_levels(depths: np.ndarray) -> dict:
    """fio's iodepth_level: % of I/Os by the I/Os in flight when they were committed (1, 2-3, 4-7 ... >=64)."""
    return _shares(np.minimum(depths, 64), [1, 3, 7, 15, 31, 63, 64], ["1", "2", "4", "8", "16", "32", ">=64"])


def call_sizes(calls: np.ndarray) -> dict:
    """fio's iodepth_submit / iodepth_complete: % of calls by the I/Os each carried (0, 1-4, 5-8 ... >64)."""
    return _shares(calls, [0, 4, 8, 16, 32, 64, 1 << 62], ["0", "4", "8", "16", "32", "64", ">=64"])
