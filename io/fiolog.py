"""fio's log files, which fio2gnuplot and fio-plot draw: write_bw_log, write_lat_log, write_iops_log.

A file per job copy, `PREFIX_bw.N.log`, `PREFIX_lat.N.log` (with `_clat` and `_slat`
beside it) and `PREFIX_iops.N.log`, N fio's job number (from 1, over every copy of every
job in file order; `per_job_logs=0` drops it); the prefix defaults to the job's name.
Each row is `msec, value, direction (0 read, 1 write), bs, [offset,] priority`, msec
since the job started: without `log_avg_msec` a row per I/O (bandwidth as fio computes
it, bytes x 10^6 / the I/O's latency in ns; latencies in ns; IOPS 1), with it a row per
window and direction (KiB/s, mean ns, IOPS over the window; bs and offset 0). Priority
is 0: no job here sets an I/O priority class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# log option -> the suffixes of the files it writes
KINDS = {"write_bw_log": ("bw",), "write_lat_log": ("lat", "clat", "slat"), "write_iops_log": ("iops",)}


def _per_io(result, suffix: str) -> np.ndarray:
    """The value each I/O logs in a per-I/O row."""
    if suffix == "bw":
        return result.sizes * 1_000_000 // np.maximum(result.lat_ns, 1)
    if suffix == "iops":
        return np.ones(len(result.sizes), np.int64)
    return {"lat": result.lat_ns, "clat": result.clat_ns, "slat": result.slat_ns}[suffix]


def _averaged(result, suffix: str, window_ms: int) -> list[tuple]:
    """(msec, value, direction) per window and direction that completed I/Os in it."""
    rows, seconds = [], window_ms / 1000
    window = (result.completed_s * 1000 // window_ms).astype(np.int64)
    latencies = _per_io(result, suffix) if suffix not in ("bw", "iops") else None  # once, not per window
    for w in np.unique(window).tolist():
        for direction in (0, 1):
            pick = (window == w) & (result.kinds == direction)
            if not pick.any():
                continue
            if suffix == "bw":
                value = int(result.sizes[pick].sum() / 1024 / seconds)
            elif suffix == "iops":
                value = int(pick.sum() / seconds)
            else:
                value = int(latencies[pick].mean())
            rows.append(((w + 1) * window_ms, value, direction))
    return rows


def rows(result, suffix: str) -> list[str]:
    """The lines of one log of one job copy."""
    o = result.instance.job.options
    if suffix == "slat" and not len(result.slat_ns):
        return []  # no submission step (psync, sync, ...): fio leaves this file empty too
    offset_column = o["log_offset"]
    if o["log_avg_msec"]:
        tail = ", 0, 0" if offset_column else ", 0"
        return [f"{t}, {v}, {d}, 0{tail}" for t, v, d in _averaged(result, suffix, o["log_avg_msec"])]
    msec = (result.completed_s * 1000).astype(np.int64).tolist()
    values, kinds, sizes = _per_io(result, suffix).tolist(), result.kinds.tolist(), result.sizes.tolist()
    if offset_column:
        return [f"{t}, {v}, {d}, {b}, {off}, 0"
                for t, v, d, b, off in zip(msec, values, kinds, sizes, result.offsets.tolist(), strict=True)]
    return [f"{t}, {v}, {d}, {b}, 0" for t, v, d, b in zip(msec, values, kinds, sizes, strict=True)]


def write_logs(results) -> list[Path]:
    """Write every log the jobs asked for (rank 0, into the current folder or the prefix's path)."""
    files: dict[Path, list[str]] = {}
    for result in sorted(results, key=lambda r: r.instance.number):
        o = result.instance.job.options
        for option, suffixes in KINDS.items():
            if o[option] is None:
                continue
            prefix = o[option] or result.instance.job.name
            for suffix in suffixes:
                number = f".{result.instance.number}" if o["per_job_logs"] else ""
                files.setdefault(Path(f"{prefix}_{suffix}{number}.log"), []).extend(rows(result, suffix))
    for path, lines in files.items():
        path.write_text("".join(line + "\n" for line in lines))
    return list(files)
