"""Per-rank bytes of parameters + gradients + optimizer state, data parallel vs ZeRO, measured.

    mpirun -n 2 python bench/zero_memory.py [--json results/zero_memory.json]

Builds the reference `cnn` with Adam, wraps it as stage 0 (DistributedOptimizer) and
stage 1 (ShardedOptimizer), and counts the bytes each rank actually holds, beside
ZeRO's theory: P parameters, P gradients, 2P Adam state; stage 1 keeps 2P/p state.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hpc_train as ht
from hpc_train import nn, optim


def held_bytes(model, wrapper) -> dict:
    params = sum(p.data.nbytes for p in model.parameters())
    grads = wrapper.flat.nbytes
    state = sum(a.nbytes for a in wrapper.optimizer.state_arrays().values())
    return {"params": params, "grads": grads, "state": state, "total": params + grads + state}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="results/zero_memory.json")
    args = parser.parse_args()
    ht.init()
    p = ht.size()
    rows = []
    for stage in (0, 1):
        model = nn.cnn()
        adam = optim.Adam(model, lr=1e-3)
        wrapper = optim.DistributedOptimizer(adam, model) if stage == 0 else optim.ShardedOptimizer(adam, model)
        measured = max(ht.runtime.world().allgather(held_bytes(model, wrapper)["total"]))
        n = model.num_parameters()
        theory = 4 * (n + n + (2 * n if stage == 0 else 2 * n / p))
        rows.append({"ranks": p, "stage": stage, "parameters": n, "measured_bytes_per_rank": measured,
                     "theory_bytes_per_rank": theory})
    if ht.rank() == 0:
        print(f"# cnn ({rows[0]['parameters']} parameters), Adam, float32, {p} rank(s); max over ranks")
        print(f"{'stage':>5} {'measured MB':>12} {'theory MB':>10}")
        for r in rows:
            measured, theory = r["measured_bytes_per_rank"] / 1e6, r["theory_bytes_per_rank"] / 1e6
            print(f"{r['stage']:>5} {measured:12.3f} {theory:10.3f}")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
