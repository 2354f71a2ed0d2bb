"""Training-I/O emulation (DLIO's method) on the real loader: read batches, "compute" by sleeping.

Accelerator utilization AU = compute time / wall time over the measured window
(the first step, which fills the prefetch queue, is excluded); DLIO calls a run
satisfactory at AU >= 0.90. Throughput counts samples delivered per second of
wall time, per rank and summed over ranks.
"""

from __future__ import annotations

import time

import numpy as np

from .hdf5_loader import HDF5Loader


def run_training_io(path, batch: int, compute_ms: float, comm, *, epochs: int = 1, collective: bool = True,
                    prefetch: int = 2) -> dict:
    """Run the emulation on every rank of comm; returns this rank's measurements."""
    with HDF5Loader(path, batch, collective=collective, prefetch=prefetch, transform=lambda a: a) as loader:
        sample_bytes = (int(np.prod(loader.sample_shape)) * loader.sample_dtype.itemsize
                        + (8 if loader.labels is not None else 0))
        waits, computes, samples = [], [], []
        comm.Barrier()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(len(loader)):
                t0 = time.perf_counter()
                images, labels = next(batches)
                t1 = time.perf_counter()
                time.sleep(compute_ms / 1000)
                t2 = time.perf_counter()
                waits.append(t1 - t0)
                computes.append(t2 - t1)
                samples.append(len(labels))
            for _ in batches:  # finish the pass: the reads are collective
                pass
    measured = slice(1, None) if len(waits) > 1 else slice(None)
    wall = float(np.sum(waits[measured]) + np.sum(computes[measured]))
    compute = float(np.sum(computes[measured]))
    delivered = int(np.sum(samples[measured]))
    return {"rank": comm.Get_rank(), "steps": len(waits), "measured_steps": len(waits[measured]),
            "samples": delivered, "wall_s": wall, "compute_s": compute,
            "data_wait_s": float(np.sum(waits[measured])),
            "au": compute / wall if wall else 0.0,
            "samples_per_s": delivered / wall if wall else 0.0,
            "mb_per_s": delivered * sample_bytes / wall / 1e6 if wall else 0.0}


def aggregate(per_rank: list[dict]) -> dict:
    """Sum throughput over ranks; AU is the lowest rank's (the slowest rank sets the pace)."""
    return {"ranks": len(per_rank), "samples_per_s": sum(r["samples_per_s"] for r in per_rank),
            "mb_per_s": sum(r["mb_per_s"] for r in per_rank), "au_min": min(r["au"] for r in per_rank),
            "au_mean": float(np.mean([r["au"] for r in per_rank])), "meets_dlio_expectation":
            min(r["au"] for r in per_rank) >= 0.90}
