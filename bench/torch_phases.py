"""Where an hpc_train.torch training step spends its time, by phase, for the two forms of zero_grad.

    mpirun -n 2 python bench/torch_phases.py [--model mlp] [--steps 400] [--replicas] [--json PATH]
    python -m cProfile -s tottime bench/torch_phases.py --steps 100      # 1 rank, by function

Run under mpirun directly (or alone, as 1 rank). One model and one DistributedOptimizer (node-shared
unless --replicas) on the models of bench/train_torch.py, one thread a rank; the steps alternate
`zero_grad(set_to_none=True)` and `zero_grad(set_to_none=False)`, so that the machine's drift hits
both forms alike, which separate runs on a noisy machine do not. Prints each rank's median of each
phase (zero_grad, forward, backward, step) and of the whole step, per form, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from train_torch import MODELS

PHASES = ("zero_grad", "forward", "backward", "step", "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
    parser.add_argument("--steps", type=int, default=400, help="timed steps, both forms together")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--replicas", action="store_true", help="replica per rank instead of node-shared")
    parser.add_argument("--json", default="results/bench_torch_phases.json")
    args = parser.parse_args()

    import torch

    import hpc_train.torch as htt
    from hpc_train.runtime import world

    torch.set_num_threads(1)
    htt.init()
    spec = MODELS[args.model]
    model = spec.build()
    opt = htt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model,
                                   bucket_mb=args.bucket_mb, node_shared=not args.replicas)
    data = spec.batches(spec.batch, torch.Generator().manual_seed(1000 + htt.rank()))
    loss_fn = torch.nn.CrossEntropyLoss()
    times = {form: {phase: [] for phase in PHASES} for form in (True, False)}
    for i in range(args.warmup + args.steps):
        set_to_none = i % 2 == 0
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=set_to_none)
        t1 = time.perf_counter()
        loss = loss_fn(model(x).flatten(0, -2), y.flatten())
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if i >= args.warmup:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                times[set_to_none][phase].append(seconds * 1e3)
    medians = {form: {phase: statistics.median(v) for phase, v in by_phase.items()} for form, by_phase in times.items()}
    everyone = world().allgather(medians)
    if htt.rank() == 0:
        mode = "replicas" if args.replicas else "node-shared"
        print(f"# {spec.title}, {mode}, {htt.size()} rank(s), median ms of {args.steps // 2} steps a form "
              f"(rank by rank)")
        print(f"{'zero_grad form':>16} " + " ".join(f"{phase:>18}" for phase in PHASES))
        for form in (True, False):
            cells = ["/".join(f"{m[form][phase]:.2f}" for m in everyone) for phase in PHASES]
            print(f"{f'set_to_none={form}':>16} " + " ".join(f"{c:>18}" for c in cells))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "benchmark": "torch_phases", "model": spec.title, "mode": mode, "ranks": htt.size(),
            "steps_per_form": args.steps // 2,
            "median_ms": [{f"set_to_none={form}": m[form] for form in (True, False)} for m in everyone]}, indent=1))
        print(f"# wrote {args.json}")
    opt.close()


if __name__ == "__main__":
    main()
