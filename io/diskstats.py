"""fio's disk_util: what the block devices under a run's files did during it (/proc/diskstats).

The device of a file is its file system's (st_dev, through /sys/dev/block); a partition
counts as its disk, as fio reports it. File systems with no block device (tmpfs, overlay,
NFS) add nothing, as in fio. Device-mapper devices are reported as themselves, without
fio's aggregated `aggr_*` figures of their underlying disks.
"""

from __future__ import annotations

import os
from pathlib import Path

SYS_DEV_BLOCK = Path("/sys/dev/block")
# /proc/diskstats fields after major, minor and name, in order (Documentation/admin-guide/iostats.rst)
FIELDS = ("read_ios", "read_merges", "read_sectors", "read_ticks", "write_ios", "write_merges", "write_sectors",
          "write_ticks", "in_flight", "io_ticks", "in_queue")
REPORTED = ("read_ios", "write_ios", "read_merges", "write_merges", "read_ticks", "write_ticks", "in_queue")


def device_of(path) -> str | None:
    """The disk holding `path` (its nearest existing folder), or None where no block device does."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    st_dev = os.stat(path).st_dev
    node = SYS_DEV_BLOCK / f"{os.major(st_dev)}:{os.minor(st_dev)}"
    if not node.exists():
        return None
    device = node.resolve()
    return device.parent.name if (device / "partition").exists() else device.name


def snapshot(names: set[str]) -> dict[str, dict[str, int]]:
    """The counters of these devices now."""
    out = {}
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 + len(FIELDS) and fields[2] in names:
            out[fields[2]] = dict(zip(FIELDS, map(int, fields[3 : 3 + len(FIELDS)]), strict=False))
    return out


def utilization(before: dict, after: dict, elapsed_ms: float) -> list[dict]:
    """fio's disk_util entries: the counters' growth over the run; util = time busy / elapsed (%)."""
    entries = []
    for name in sorted(set(before) & set(after)):
        grown = {key: after[name][key] - before[name][key] for key in FIELDS}
        entry = {"name": name, **{key: grown[key] for key in REPORTED}}
        entry["util"] = min(100.0, 100.0 * grown["io_ticks"] / elapsed_ms) if elapsed_ms > 0 else 0.0
        entries.append(entry)
    return entries


def merge(per_rank: list[tuple[str, list[dict]]]) -> list[dict]:
    """One entry per device and host from every rank's (host, entries): the lowest rank's where
    ranks of one host watched the same device; names carry the host once there are several."""
    seen: dict[tuple[str, str], dict] = {}
    for host, entries in per_rank:
        for entry in entries:
            seen.setdefault((host, entry["name"]), entry)
    several = len({host for host, _ in seen}) > 1
    return [{**entry, "name": f"{host}:{name}"} if several else entry for (host, name), entry in seen.items()]
