"""Parameter server vs synchronous allreduce under a straggler: wall-clock time to a target loss.

    mpirun -n 4 python bench/ps.py [--steps 240] [--repeats 3] [--json results/ps.json] [--plot results/ps.png]

Every mode trains the same MLP (3072-256-10) on the synthetic set, each worker on its own
batches of 64, SGD with momentum 0.9 (a worker-local buffer under the parameter
server); one run without a straggler and one where rank p-1 sleeps twice its
measured step time every step (3x slower). Rank 0 snapshots the parameters every 10
steps (its own under allreduce, the stored ones otherwise) with the time since a
common start; after the run the snapshots are scored on a held-out set. The target is
the loss synchronous allreduce reaches halfway through its straggler-free run. Every
(scenario, mode) runs --repeats times, interleaved; the median time to target is kept.
Threads are pinned to one per rank. Modes: allreduce (DistributedOptimizer), async,
ssp (s = 2), easgd (tau = 4, alpha = 0.5), staleness_lr. Prints a table, writes JSON and
a plot of loss against wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import hpc_train as ht
from hpc_train import nn, optim
from hpc_train.data import synthetic_classification, to_float
from hpc_train.ps import ParameterServerOptimizer

MODES = ("allreduce", "async", "ssp", "easgd", "staleness_lr")
BATCH, LR, MOMENTUM, SNAPSHOT_EVERY = 64, 0.01, 0.9, 10


def run(mode: str, steps: int, delay: float, data, comm) -> list[tuple[float, np.ndarray]]:
    """Train; rank 0 returns (seconds since the common start, parameters) snapshots."""
    p, r = comm.Get_size(), comm.Get_rank()
    x, y = data
    model = nn.mlp((3072, 256, 10), seed=0)
    if mode == "allreduce":
        opt = optim.DistributedOptimizer(optim.SGD(model, LR, momentum=MOMENTUM), model)
    else:
        per_push = LR if mode == "easgd" else LR / p  # p pushes carry one synchronous step's data
        opt = ParameterServerOptimizer(model, per_push, mode, staleness=2, tau=4, alpha=0.5, momentum=MOMENTUM,
                                       comm=comm, delay_s=delay if r == p - 1 else 0.0)
    loss = nn.SoftmaxCrossEntropy()
    snapshots = []
    comm.Barrier()
    start = time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        index = np.arange((step * p + r) * BATCH, (step * p + r + 1) * BATCH) % len(x)
        loss.forward(model.train()(x[index]), y[index])
        model.backward(loss.backward())
        if mode == "allreduce" and delay and r == p - 1:
            time.sleep(delay)
        opt.step()
        if r == 0 and step % SNAPSHOT_EVERY == SNAPSHOT_EVERY - 1:
            if mode == "allreduce":
                params = np.concatenate([q.data.reshape(-1) for q in model.parameters()])
            else:
                params = opt.store.pull(np.empty(opt.store.size, opt.store.dtype))
            snapshots.append((time.perf_counter() - start, params))
    if mode != "allreduce":
        opt.close()
    comm.Barrier()
    return snapshots


def score(snapshots, held_out) -> list[tuple[float, float]]:
    model, loss = nn.mlp((3072, 256, 10), seed=0).eval(), nn.SoftmaxCrossEntropy()
    x, y = held_out
    out = []
    for seconds, flat in snapshots:
        offset = 0
        for q in model.parameters():
            q.data = flat[offset : offset + q.size].reshape(q.data.shape)
            offset += q.size
        out.append((seconds, float(loss.forward(model(x), y))))
    return out


def step_time(data, comm) -> float:
    """Median seconds of one worker's forward + backward + allreduce step, measured here."""
    snaps = run("allreduce", 2 * SNAPSHOT_EVERY, 0.0, data, comm)
    times = comm.bcast([t for t, _ in snaps] if comm.Get_rank() == 0 else None)
    return (times[-1] - times[0]) / SNAPSHOT_EVERY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="results/ps.json")
    parser.add_argument("--plot", default="results/ps.png")
    args = parser.parse_args()
    threadpool_limits(1)
    ht.init()
    comm = ht.runtime.world()
    p = comm.Get_size()
    images, labels = synthetic_classification(BATCH * p * 40 + 1024, seed=1)
    images = to_float(images).reshape(-1, 3072)
    data, held_out = (images[:-1024], labels[:-1024]), (images[-1024:], labels[-1024:])
    delay = 2 * step_time(data, comm)
    curves: dict[tuple, list] = {}
    for _ in range(args.repeats):
        for scenario, wait in (("no straggler", 0.0), (f"rank {p - 1} 3x slower", delay)):
            for mode in MODES:
                snapshots = run(mode, args.steps, wait, data, comm)
                if comm.Get_rank() == 0:
                    curves.setdefault((scenario, mode), []).append(score(snapshots, held_out))
    if comm.Get_rank() != 0:
        return 0
    references = curves[("no straggler", "allreduce")]
    target = statistics.median(curve[len(curve) // 2 - 1][1] for curve in references)
    rows = []
    for (scenario, mode), runs in curves.items():
        times = [next((t for t, value in curve if value <= target), math.inf) for curve in runs]
        reached = statistics.median(times)
        rows.append({"scenario": scenario, "mode": mode, "seconds_to_target": None if math.isinf(reached) else reached,
                     "runs_seconds_to_target": [None if math.isinf(t) else t for t in times],
                     "final_loss": statistics.median(curve[-1][1] for curve in runs), "curve": runs[0]})
    print(f"# {p} ranks, MLP 3072-256-10, batch {BATCH} per worker, {args.steps} steps per worker, median of "
          f"{args.repeats} interleaved repeats; target loss "
          f"{target:.4f} (allreduce, halfway); straggler sleeps {1e3 * delay:.1f} ms a step (2x the measured "
          f"{1e3 * delay / 2:.1f} ms)")
    print(f"{'scenario':<22} {'mode':<13} {'s to target':>12} {'vs allreduce':>13} {'final loss':>11}")
    for row in rows:
        sync = next(r for r in rows if r["scenario"] == row["scenario"] and r["mode"] == "allreduce")
        speedup = (sync["seconds_to_target"] / row["seconds_to_target"]
                   if row["seconds_to_target"] and sync["seconds_to_target"] else None)
        row["speedup_vs_allreduce"] = speedup
        reached = f"{row['seconds_to_target']:.2f}" if row["seconds_to_target"] else "not reached"
        print(f"{row['scenario']:<22} {row['mode']:<13} {reached:>12} "
              f"{(f'{speedup:.2f}x' if speedup else '-'):>13} {row['final_loss']:>11.4f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"ranks": p, "target": target, "delay_s": delay, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# no plot: matplotlib is not installed")
        return 0
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, scenario in zip(axes, dict.fromkeys(s for s, _ in curves), strict=True):
        for row in rows:
            if row["scenario"] == scenario:
                ax.plot([t for t, _ in row["curve"]], [v for _, v in row["curve"]], label=row["mode"])
        ax.axhline(target, color="k", linestyle=":", label="target")
        ax.set_title(scenario)
        ax.set_xlabel("wall time (s)")
    axes[0].set_ylabel("held-out loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"# wrote {args.json}, {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
