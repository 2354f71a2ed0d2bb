"""Training-step benchmark of torch models: plain PyTorch, DDP over gloo, the same DDP script over our
torch.distributed backend "hpc", hpc_train.torch (replicas and node-shared) and, where it is installed,
Horovod.

    python bench/train_torch.py [--model mlp|resnet20|gpt] [--ranks 1,2] [--steps 45] [--repeats 3] [--json PATH]

The same torch model on every side (`mlp`: the MLP 3072-1024-512-10 of bench/train.py, batch 128 a rank;
`resnet20`: hpc_train.torch.models' ResNet-20 on 32x32x3 images, batch 32 a rank; `gpt`: the ByteGPT of
jobs/torch_gpt.toml, windows of 128 bytes, 16 a rank), batch fixed per rank
(weak scaling), one thread per rank, SGD with momentum. Each configuration is its own `mpirun` job,
time-boxed; sides are interleaved within a repeat and the median over repeats of each run's median step
(its slowest rank's) is kept. `plain` is one process training alone; at 2 ranks it is two such processes
running at once without communicating: the contention baseline of a node whose ranks share memory
bandwidth. `ddp-barrier` is the same DDP script over a backend whose every collective is an MPI barrier and
moves nothing: DDP's own work (copying gradients into its buckets and back, its hooks) and the ranks
waiting for each other once a bucket, the least step time any backend can give that script; its
ranks do not average, so its losses are not compared. Ranks beyond the machine's cores are
oversubscribed (marked in the table).

Reports step time, samples/s, weak-scaling efficiency t(plain, 1) / t(side, n), exposed communication
(ours: waiting for buckets after backward plus the node barrier), and the per-step losses of rank 0 for
DDP and ours side by side (the same averaged gradient: equal within float32 tolerance).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from train import WIDTHS, rank_results, timed_steps

SIDES = ("plain", "ddp-barrier", "ddp-gloo", "ddp-hpc", "ours-replicas", "ours-node-shared", "horovod")


@dataclass(frozen=True)
class Model:
    """A benchmarked model: its name in tables, its factory in hpc_train.torch.models and keyword
    arguments, its default batch a rank, and the shape of one input (images of floats, or windows of
    bytes whose targets are the next bytes)."""

    title: str
    factory: str
    kwargs: dict
    batch: int
    input_shape: tuple
    tokens: bool = False

    def build(self):
        import torch

        from hpc_train.torch import models

        torch.manual_seed(0)  # the same initial parameters on every side and rank
        return getattr(models, self.factory)(**self.kwargs)

    def batches(self, batch: int, generator, count: int = 4) -> list:
        """`count` random batches (x, y), the same on every side for a given generator."""
        import torch

        if self.tokens:
            windows = [torch.randint(0, 256, (batch, self.input_shape[0] + 1), generator=generator)
                       for _ in range(count)]
            return [(w[:, :-1], w[:, 1:]) for w in windows]
        return [(torch.randn(batch, *self.input_shape, generator=generator),
                 torch.randint(0, WIDTHS[-1], (batch,), generator=generator)) for _ in range(count)]


MODELS = {"mlp": Model("MLP " + "-".join(map(str, WIDTHS)), "mlp", {"widths": list(WIDTHS)}, 128, (WIDTHS[0],)),
          "resnet20": Model("ResNet-20", "resnet20", {}, 32, (32, 32, 3)),
          "gpt": Model("ByteGPT 128x4, context 128", "ByteGPT", {"context": 128, "width": 128, "layers": 4},
                       16, (128,), tokens=True)}


def register_null_backend() -> None:
    """The backend "nothing" of the `ddp-barrier` side: every collective is a barrier and moves nothing."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    class Done(dist._Work):
        def __init__(self, outputs):
            super().__init__()
            self._future = torch.futures.Future()
            self._future.set_result(outputs)

        def wait(self, timeout=None) -> bool:
            return True

        def is_completed(self) -> bool:
            return True

        def get_future(self):
            return self._future

    class Nothing(dist.ProcessGroup):
        def getBackendName(self) -> str:
            return "nothing"

        def allreduce(self, tensors, opts):
            MPI.COMM_WORLD.Barrier()
            return Done(tensors)

        broadcast = allreduce

        def allgather(self, output_lists, inputs, opts):  # DDP's start-up check of parameter shapes
            for outputs, tensor in zip(output_lists, inputs, strict=True):
                for output in outputs:
                    output.copy_(tensor)
            return Done(output_lists)

        def barrier(self, opts):
            return self.allreduce([], opts)

    dist.Backend.register_backend("nothing", lambda options, _=None: Nothing(options.group_rank, options.group_size),
                                  extended_api=True, devices=["cpu"])


def worker(args) -> dict:
    import torch

    torch.set_num_threads(1)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", 0)))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", 1)))
    spec = MODELS[args.model]
    model = spec.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    exposed = None
    if args.worker.startswith("ddp") and size > 1:  # one DDP script; only the init line differs
        import torch.distributed as dist

        if args.worker == "ddp-hpc":
            import hpc_train.torch  # noqa: F401 (registers the backend "hpc")

            dist.init_process_group("hpc")
        else:
            if args.worker == "ddp-barrier":
                register_null_backend()
            dist.init_process_group({"ddp-barrier": "nothing"}.get(args.worker, "gloo"),
                                    init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=size)
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    elif args.worker.startswith("ours"):
        import hpc_train.torch as htt

        htt.init()
        opt = htt.DistributedOptimizer(opt, model, bucket_mb=args.bucket_mb,
                                       node_shared=args.worker == "ours-node-shared")
        exposed = []
    elif args.worker == "horovod":
        import horovod.torch as hvd

        hvd.init()
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    generator = torch.Generator().manual_seed(1000 + rank)  # every rank its own shard, the same on every side
    data = spec.batches(args.batch, generator)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []

    def step():
        x, y = data[len(losses) % len(data)]
        opt.zero_grad()
        loss = loss_fn(model(x).flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if exposed is not None:
            exposed.append(opt.exposed_s)

    times = timed_steps(step, args.steps)
    return {"step_s": statistics.median(times), "rank": rank, "losses": losses,
            "exposed_s": statistics.median(exposed[-args.steps:]) if exposed else None}


def free_port() -> int:
    """A TCP port nobody listens on now (gloo's rendezvous; a fixed one can still be in TIME_WAIT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(side: str, ranks: int, args) -> dict | None:
    """One mpirun job: the slowest rank's median step, rank 0's losses."""
    results = rank_results(__file__, side, ranks, ["--steps", str(args.steps), "--batch", str(args.batch),
                                                   "--bucket-mb", str(args.bucket_mb), "--port", str(free_port()),
                                                   "--model", args.model], args.timeout)
    if results is None:
        return None
    slowest = max(results, key=lambda r: r["step_s"])
    first = min(results, key=lambda r: r["rank"])
    return {"step_s": slowest["step_s"], "exposed_s": slowest["exposed_s"], "losses": first["losses"]}


def available(side: str) -> bool:
    module = {"horovod": "horovod.torch"}.get(side, "torch")
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=45, help="timed steps a run (after 5 warm-up steps)")
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
    parser.add_argument("--batch", type=int, default=0, help="samples per rank (0: the model's default)")
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--json", default="results/bench_train_torch.json")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or MODELS[args.model].batch
    if args.worker:
        result = worker(args)
        Path(args.out, f"rank{result['rank']}.json").write_text(json.dumps(result))
        return 0

    sides = [s for s in args.sides.split(",") if available(s)]
    for missing in sorted(set(args.sides.split(",")) - set(sides)):
        print(f"# {missing}: not installed here, its rows are skipped")
    ranks = [int(r) for r in args.ranks.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for n in ranks:
            for side in sides:  # interleaved: machine noise hits every side alike
                if result := run(side, n, args):
                    runs.setdefault((side, n), []).append(result)
    cores = os.cpu_count() or 1
    rows = []
    for (side, n), results in sorted(runs.items(), key=lambda item: (item[0][1], SIDES.index(item[0][0]))):
        step = statistics.median(r["step_s"] for r in results)
        exposed = [r["exposed_s"] for r in results if r["exposed_s"] is not None]
        rows.append({"side": side, "ranks": n, "oversubscribed": n > cores, "step_ms": 1e3 * step,
                     "samples_per_s": n * args.batch / step,
                     "exposed_fraction": statistics.median(exposed) / step if exposed else None,
                     "losses_rank0": results[0]["losses"], "runs": len(results)})
    by = {(r["side"], r["ranks"]): r for r in rows}
    single = by.get(("plain", 1))
    for r in rows:
        r["weak_scaling_efficiency"] = single["step_ms"] / r["step_ms"] if single else None
    print(f"# {MODELS[args.model].title}, batch {args.batch} per rank, SGD momentum, 1 thread per rank, "
          f"median of {args.repeats} runs x {args.steps} steps; {cores} cores")
    print(f"{'side':>17} {'ranks':>6} {'step ms':>9} {'samples/s':>10} {'exposed':>8} {'weak eff':>9}")
    for r in rows:
        exposed = f"{100 * r['exposed_fraction']:7.1f}%" if r["exposed_fraction"] is not None else f"{'-':>8}"
        eff = f"{100 * r['weak_scaling_efficiency']:8.1f}%" if r["weak_scaling_efficiency"] else f"{'-':>9}"
        ranks_col = f"{r['ranks']}{'*' if r['oversubscribed'] else ''}"
        print(f"{r['side']:>17} {ranks_col:>6} {r['step_ms']:9.2f} {r['samples_per_s']:10.0f} {exposed} {eff}")
    if any(r["oversubscribed"] for r in rows):
        print("# * oversubscribed: more ranks than cores")
    for n in ranks:
        for ddp in ("ddp-hpc", "ddp-barrier"):
            if (ddp, n) in by and ("ddp-gloo", n) in by:
                print(f"# {n} rank(s): {ddp} / ddp-gloo step time = "
                      f"{by[(ddp, n)]['step_ms'] / by[('ddp-gloo', n)]['step_ms']:.2f}")
        for ours in ("ours-node-shared", "ours-replicas"):
            for other in ("ddp-gloo", "horovod", "plain"):
                if (ours, n) in by and (other, 1 if other == "plain" else n) in by:
                    reference = by[(other, 1 if other == "plain" else n)]
                    print(f"# {n} rank(s): {ours} / {other}{' (1 rank)' if other == 'plain' else ''} step time = "
                          f"{by[(ours, n)]['step_ms'] / reference['step_ms']:.2f}")
    for n in ranks:
        if ("ddp-gloo", n) in by and n > 1:
            ddp = by[("ddp-gloo", n)]["losses_rank0"]
            for ours in ("ddp-hpc", "ours-replicas", "ours-node-shared", "horovod"):
                if (ours, n) in by:
                    mine = by[(ours, n)]["losses_rank0"]
                    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine[:50], ddp[:50], strict=True))
                    print(f"# {n} ranks: {ours} vs ddp-gloo losses of rank 0, first {min(50, len(ddp))} steps: "
                          f"largest relative difference {worst:.2e}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "train_torch", "model": MODELS[args.model].title, "batch": args.batch,
           "steps": args.steps, "repeats": args.repeats, "cores": cores, "rows": rows}
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
