"""Per-rank bytes of parameters + gradients + optimizer state, data parallel vs ZeRO 1-3, measured.

    mpirun -n 2 python bench/zero_memory.py [--bucket-mb 0.25] [--json results/zero_memory.json]
        [--model cnn | --model mlp --width 2048 --depth 4]

Builds the reference `cnn` (or an MLP of `depth` hidden layers of `width`: at the defaults 18.9 M
parameters, whose ~300 MB of parameters, gradients and Adam state dwarf the first step's
one-time costs, so that the resident figure resolves what ZeRO saves) with Adam (float32), wraps it as stage 0
(DistributedOptimizer) and stages 1-3 (ShardedOptimizer), trains two steps on
random data and counts the bytes each rank holds: persistent arrays plus the
high-water mark of transient ones (gradient buckets in flight, gathered layers).
Beside that tally, two figures the process gives itself. The peak of NumPy's
allocations as tracemalloc sees them, from before the model is built to after the
two steps: it sees what the tally may miss (a full-size temporary, optimizer state
created whole before being sharded) and what the tally leaves out on purpose
(activations, im2col buffers), but not MPI shared-memory windows (the fusion buffer
of stages 0 and 1, which the tally counts). And the growth of the peak resident set
(VmHWM, reset through /proc/self/clear_refs before the model is built, minus VmRSS
then; once after the strategy is built, before any step, and once after two steps), which
sees everything the process touches, shared windows included. The allocator keeps freed
memory, so the resident figure means something only for the first stage a process runs:
measure it one stage a launch,

    for s in 0 1 2 3; do mpirun -n 2 python bench/zero_memory.py --stage $s; done

Theory (ZeRO paper, 4-byte parameters and gradients, 8-byte Adam state, P
parameters, p ranks): stage 0 16P, stage 1 8P + 8P/p, stage 2 4P + 12P/p,
stage 3 16P/p; transient buffers come on top and do not shrink with p.
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc
from pathlib import Path

import numpy as np

import hpc_train as ht
from hpc_train import nn, optim


def theory_bytes(stage: int, n: int, p: int) -> float:
    params = 4 * n / p if stage == 3 else 4 * n
    grads = 4 * n / p if stage >= 2 else 4 * n
    state = 8 * n / p if stage >= 1 else 8 * n
    return params + grads + state


def status_kb(field: str) -> int:
    """A figure of /proc/self/status, kB (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_resident() -> None:
    """Start VmHWM again from the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def build(args):
    """The model and a batch maker for it."""
    if args.model == "cnn":
        return nn.cnn(), lambda rng: rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    widths = (3072, *([args.width] * args.depth), 10)
    return nn.mlp(widths), lambda rng: rng.standard_normal((8, 3072)).astype(np.float32)


def measure(stage: int, args, rank: int) -> tuple[int, dict, int, int, int]:
    bucket_mb = args.bucket_mb
    gc.collect()
    reset_peak_resident()
    resident_kb = status_kb("VmRSS")
    tracemalloc.start()
    model, batch = build(args)
    adam = optim.Adam(model, lr=1e-3)
    if stage == 0:
        wrapper = optim.DistributedOptimizer(adam, model, bucket_mb=bucket_mb)
    else:
        wrapper = optim.ShardedOptimizer(adam, model, stage=stage, bucket_mb=bucket_mb)
    at_start = 1024 * (status_kb("VmHWM") - resident_kb)  # built and wrapped, before any step
    loss = nn.SoftmaxCrossEntropy()
    rng = np.random.default_rng(rank)
    for _ in range(2):
        wrapper.zero_grad()
        loss.forward(model(batch(rng)), rng.integers(0, 10, 8))
        model.backward(loss.backward())
        wrapper.step()
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    resident_growth = 1024 * (status_kb("VmHWM") - resident_kb)
    return model.num_parameters(), wrapper.held_bytes(), traced_peak, at_start, resident_growth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bucket-mb", type=float, default=0.25, help="gradient bucket size (default 0.25)")
    parser.add_argument("--stage", type=int, action="append", choices=(0, 1, 2, 3),
                        help="measure this stage (repeatable; default all, in turn: see above for the resident figure)")
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--width", type=int, default=2048, help="mlp: hidden width (default 2048)")
    parser.add_argument("--depth", type=int, default=4, help="mlp: hidden layers (default 4)")
    parser.add_argument("--json", default="results/zero_memory.json")
    args = parser.parse_args()
    ht.init()
    p, world = ht.size(), ht.runtime.world()
    rows = []
    for stage in args.stage or (0, 1, 2, 3):
        n, held, traced, at_start, resident = measure(stage, args, ht.rank())
        worst = max(world.allgather(held), key=lambda h: h["total"])
        traced, at_start, resident = (max(world.allgather(v)) for v in (traced, at_start, resident))
        rows.append({"ranks": p, "stage": stage, "model": args.model, "parameters": n, "bucket_mb": args.bucket_mb,
                     "measured_bytes_per_rank": worst["total"], "transient_bytes": worst["transient"],
                     "split": {k: worst[k] for k in ("params", "grads", "state")},
                     "theory_bytes_per_rank": theory_bytes(stage, n, p), "traced_peak_bytes": traced,
                     "resident_peak_at_start_bytes": at_start, "resident_peak_growth_bytes": resident})
    if ht.rank() == 0:
        model = "cnn" if args.model == "cnn" else f"mlp {args.depth} x {args.width}"
        print(f"# {model} ({rows[0]['parameters']} parameters), Adam, float32, {p} rank(s), buckets of "
              f"{args.bucket_mb} MB; max over ranks")
        print(f"{'stage':>5} {'tally MB':>9} {'persistent MB':>14} {'transient MB':>13} {'theory MB':>10} "
              f"{'persistent/theory':>18} {'traced peak MB':>15} {'RSS at start MB':>16} {'RSS peak growth MB':>19}")
        for r in rows:
            measured, theory = r["measured_bytes_per_rank"] / 1e6, r["theory_bytes_per_rank"] / 1e6
            transient = r["transient_bytes"] / 1e6
            print(f"{r['stage']:>5} {measured:9.3f} {measured - transient:14.3f} {transient:13.3f} {theory:10.3f} "
                  f"{(measured - transient) / theory:18.3f} {r['traced_peak_bytes'] / 1e6:15.3f} "
                  f"{r['resident_peak_at_start_bytes'] / 1e6:16.3f} {r['resident_peak_growth_bytes'] / 1e6:19.3f}")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
