"""Training-step benchmark: hpc_train against PyTorch DDP (gloo, CPU) on the same MLP.

    python bench/train.py [--steps 30] [--repeats 3] [--wrapper node-shared] [--json results/bench_train.json]

Runs each configuration as its own `mpirun` job (time-boxed), interleaving ours
and PyTorch's, and keeps the median step time of each run, then the median over
repeats. BLAS / OpenMP threads are pinned to 1 per rank on both sides, batch is
per rank (weak scaling). PyTorch is optional: `pip install torch==2.13.0` (a CPU
build already on the development machine); without it those rows are skipped.
Reports step time, samples/s per rank and in total, the exposed-communication
fraction (ours: waiting for gradient buckets after backward) and the weak-scaling
efficiency t(1 rank) / t(2 ranks). `--wrapper` picks our data-parallel optimizer:
NodeSharedOptimizer (what `hpc-train train` uses), DistributedOptimizer (a replica
per rank) or ZeRO stage 1-3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTHS = (3072, 1024, 512, 10)
WRAPPERS = ("node-shared", "distributed", "zero1", "zero2", "zero3")
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_mpi_yield_when_idle": "1", "OMPI_MCA_rmaps_base_oversubscribe": "true",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def timed_steps(step, steps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def worker_ours(args) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_limits

    import hpc_train as ht
    from hpc_train import nn, optim

    ht.init()
    threadpool_limits(1)
    rng = np.random.default_rng(ht.rank())
    x = rng.standard_normal((args.batch, WIDTHS[0])).astype(np.float32)
    y = rng.integers(0, WIDTHS[-1], args.batch)
    model = nn.mlp(WIDTHS, seed=0)
    sgd = optim.SGD(model, lr=0.01, momentum=0.9)
    if args.wrapper.startswith("zero"):
        dist = optim.ShardedOptimizer(sgd, model, stage=int(args.wrapper[4:]), bucket_mb=args.bucket_mb)
    else:
        wrapper = optim.NodeSharedOptimizer if args.wrapper == "node-shared" else optim.DistributedOptimizer
        dist = wrapper(sgd, model, bucket_mb=args.bucket_mb)
    loss = nn.SoftmaxCrossEntropy()
    exposed = []

    def step():
        dist.zero_grad()
        loss.forward(model(x), y)
        model.backward(loss.backward())
        dist.step()
        exposed.append(dist.exposed_s)

    times = timed_steps(step, args.steps)
    return {"step_s": statistics.median(times), "exposed_s": statistics.median(exposed[-args.steps:]),
            "ranks": ht.size(), "rank": ht.rank()}


def worker_torch(args) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", 0))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))
    torch.manual_seed(rank)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=False)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                                world_size=size)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, WIDTHS[0])
    y = torch.randint(0, WIDTHS[-1], (args.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    times = timed_steps(step, args.steps)
    if size > 1:
        dist.destroy_process_group()
    return {"step_s": statistics.median(times), "exposed_s": None, "ranks": size, "rank": rank}


def rank_results(script: str, side: str, ranks: int, args: list[str], timeout: float) -> list[dict] | None:
    """`mpirun -n ranks python script --worker side ARGS --out DIR`, time-boxed: each rank's JSON result
    (what the worker wrote to DIR/rank<r>.json), or None after saying why on stderr."""
    out = tempfile.mkdtemp(prefix="hpc_train_bench_")
    cmd = ["mpirun", "-n", str(ranks), sys.executable, script, "--worker", side, *args, "--out", out]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **MPI_ENV})
    except subprocess.TimeoutExpired:
        print(f"# {side} at {ranks} ranks: timed out after {timeout} s", file=sys.stderr)
        return None
    if proc.returncode != 0:
        print(f"# {side} at {ranks} ranks failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return [json.loads(path.read_text()) for path in Path(out).glob("rank*.json")]


def run_config(side: str, ranks: int, args, port: int) -> dict | None:
    """One mpirun job; the slowest rank's median step time."""
    results = rank_results(__file__, side, ranks, ["--steps", str(args.steps), "--batch", str(args.batch),
                                                   "--bucket-mb", str(args.bucket_mb), "--wrapper", args.wrapper,
                                                   "--port", str(port)], args.timeout)
    if results is None:
        return None
    slowest = max(results, key=lambda r: r["step_s"])
    return {"step_s": slowest["step_s"], "exposed_s": slowest["exposed_s"]}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128, help="samples per rank")
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wrapper", choices=WRAPPERS, default="node-shared",
                        help="our data-parallel optimizer (default %(default)s)")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--json", default="results/bench_train.json")
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=29517, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_torch)(args)
        Path(args.out, f"rank{result['rank']}.json").write_text(json.dumps(result))
        return 0

    sides = ["ours"] + (["torch"] if torch_available() else [])
    if "torch" not in sides:
        print("# PyTorch not installed (pip install torch==2.13.0): its rows are skipped")
    ranks = [int(r) for r in args.ranks.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for n in ranks:
            for side in sides:  # interleaved: machine noise hits both sides alike
                result = run_config(side, n, args, args.port + repeat * 10 + n)
                if result is not None:
                    runs.setdefault((side, n), []).append(result)
    rows = []
    for (side, n), results in sorted(runs.items()):
        step = statistics.median(r["step_s"] for r in results)
        exposed = [r["exposed_s"] for r in results if r["exposed_s"] is not None]
        rows.append({"side": side, "ranks": n, "step_ms": 1e3 * step,
                     "samples_per_s_per_rank": args.batch / step,
                     "samples_per_s": n * args.batch / step,
                     "exposed_fraction": statistics.median(exposed) / step if exposed else None,
                     "runs": len(results)})
    by = {(r["side"], r["ranks"]): r for r in rows}
    for r in rows:
        single = by.get((r["side"], 1))
        r["weak_scaling_efficiency"] = single["step_ms"] / r["step_ms"] if single else None
    print(f"# MLP {'-'.join(map(str, WIDTHS))}, batch {args.batch} per rank, SGD momentum, "
          f"1 thread per rank, "
          f"median of {args.repeats} runs x {args.steps} steps")
    print(f"{'side':>6} {'ranks':>5} {'step ms':>9} {'samples/s/rank':>15} {'samples/s':>10} {'exposed':>8} "
          f"{'weak eff':>9}")
    for r in rows:
        exposed = f"{100 * r['exposed_fraction']:7.1f}%" if r["exposed_fraction"] is not None else f"{'-':>8}"
        eff = f"{100 * r['weak_scaling_efficiency']:8.1f}%" if r["weak_scaling_efficiency"] else f"{'-':>9}"
        print(f"{r['side']:>6} {r['ranks']:>5} {r['step_ms']:9.2f} {r['samples_per_s_per_rank']:15.0f} "
              f"{r['samples_per_s']:10.0f} {exposed} {eff}")
    for n in ranks:
        if ("ours", n) in by and ("torch", n) in by:
            ratio = by[("ours", n)]["step_ms"] / by[("torch", n)]["step_ms"]
            print(f"# {n} rank(s): ours / PyTorch step time = {ratio:.2f}")
    if ("ours", 2) in by and ("torch", 1) in by:
        print(f"# ours at 2 ranks / PyTorch single-rank step = "
              f"{by[('ours', 2)]['step_ms'] / by[('torch', 1)]['step_ms']:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "train", "widths": WIDTHS, "batch": args.batch, "steps": args.steps,
           "repeats": args.repeats, "rows": rows}
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
