"""Allreduce benchmark in the style of nccl-tests, measured against MPI in the same run.

For every size, every algorithm is timed in turn (interleaved, in a shuffled
order), the whole round repeated, and the median kept; `vs_mpi` is the median of per-round ratios to the
library's own MPI_Allreduce, so machine noise hits both sides alike. Time per
iteration is averaged over ranks (OSU / nccl-tests convention). The physical
reference is the aggregate copy bandwidth B of all ranks of the node copying at
once: an allreduce moves at least ~1.5 copies of the array per rank, so on one
node busbw cannot exceed (2(p-1)/p) * B / (1.5 p).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import runtime
from ..comm import ALGORITHMS, allreduce, shared_empty
from ..comm import auto as auto_table
from ..comm.ops import bfloat16_dtype
from ..units import format_size

SHARED_SUFFIX = "+shared"  # input already in node-shared memory, reduced in place


@dataclass
class Row:
    size: int
    count: int
    dtype: str
    op: str
    algorithm: str
    time_us: float
    algbw: float
    busbw: float
    wrong: int
    vs_mpi: float | None
    limit_busbw: float | None
    copy_gbps: float | None


def sweep(begin: int, end: int, factor: int) -> list[int]:
    sizes, size = [], begin
    while size <= end:
        sizes.append(size)
        size *= factor
    return sizes


def resolve_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        bf16 = bfloat16_dtype()
        if bf16 is None:
            raise ValueError("dtype bfloat16 needs ml_dtypes (pip install ml_dtypes)")
        return bf16
    return np.dtype(name)


def bus_factor(p: int) -> float:
    return 2 * (p - 1) / p if p > 1 else 1.0


def fill_pattern(a: np.ndarray, rank: int) -> None:
    """Small integers, so every sum is exact in every float type and the check is strict."""
    a[...] = (np.arange(a.size) % 7 + rank).astype(a.dtype)


def count_wrong(result: np.ndarray, p: int, op: str) -> int:
    base = np.arange(result.size) % 7
    ranks = np.arange(p)
    if op == "sum":
        expected = base * p + ranks.sum()
    elif op == "mean":
        expected = (base * p + ranks.sum()) / p
    elif op == "max":
        expected = base + p - 1
    elif op == "min":
        expected = base
    else:
        expected = np.prod(base[None, :] + ranks[:, None], axis=0)
    want = expected.astype(result.dtype).astype(np.float64)
    return int(np.count_nonzero(result.astype(np.float64) != want))


class Case:
    """One algorithm at one size: buffers, the call to time, and its correctness check."""

    def __init__(self, algorithm: str, count: int, dtype, op: str, comm):
        from mpi4py import MPI

        self.algorithm, self.op, self.comm = algorithm, op, comm
        rank = comm.Get_rank()
        base = algorithm.removesuffix(SHARED_SUFFIX)
        if algorithm.endswith(SHARED_SUFFIX):
            self.send = self.recv = shared_empty(count, dtype)
            fill_pattern(self.send, rank)
            self.call = lambda: allreduce(self.send, op, base, out=self.send)
        else:
            self.send = np.empty(count, dtype)
            self.recv = np.empty(count, dtype)
            fill_pattern(self.send, rank)
            native = dtype.kind in "iufc" and op != "mean"
            if base == "mpi" and native:  # the library's own call, nothing of ours around it
                mpi_op = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}[op]
                self.call = lambda: comm.Allreduce(self.send, self.recv, op=mpi_op)
            else:  # ours; for `mpi` on types or ops MPI lacks, our wrapper around the same call
                self.call = lambda: allreduce(self.send, op, base, out=self.recv)

    def check(self) -> int:
        """Run once on the pattern; elements wrong, summed over ranks."""
        fill_pattern(self.send, self.comm.Get_rank())
        self.call()
        return self.comm.allreduce(count_wrong(self.recv, self.comm.Get_size(), self.op))

    def time_per_call(self, iterations: int) -> float:
        """Seconds per call averaged over ranks."""
        self.comm.Barrier()
        start = time.perf_counter()
        for _ in range(iterations):
            self.call()
        elapsed = (time.perf_counter() - start) / iterations
        return self.comm.allreduce(elapsed) / self.comm.Get_size()


def copy_bandwidth(nbytes: int, comm, iterations: int) -> float:
    """Aggregate np.copyto bandwidth (B/s) of all ranks of this node copying at once."""
    node = runtime.topology().node
    src = np.ones(max(1, nbytes), np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    node.Barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        np.copyto(dst, src)
    elapsed = node.allreduce(time.perf_counter() - start, op=_mpi_max())
    return node.Get_size() * src.nbytes * iterations / elapsed


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX


def choose_iterations(case: Case, warmup: int, min_time: float, max_iterations: int) -> int:
    """Iterations so that one timed batch lasts ~min_time; identical on every rank."""
    for _ in range(max(1, warmup)):
        case.call()
    probe = case.time_per_call(max(1, warmup))
    wanted = int(min_time / max(probe, 1e-7))
    return case.comm.allreduce(max(3, min(max_iterations, wanted)), op=_mpi_max())


def run(sizes, algorithms, dtype, op: str, repeats: int, warmup: int, min_time: float,
        max_iterations: int) -> list[Row]:
    comm = runtime.world()
    p = comm.Get_size()
    single_node = runtime.topology().num_nodes == 1
    rows: list[Row] = []
    if "mpi" not in algorithms:
        algorithms = ["mpi", *algorithms]
    for size in sizes:
        count = size // dtype.itemsize
        if count == 0:
            continue
        cases = [Case(a, count, dtype, op, comm) for a in algorithms]
        wrong = {c.algorithm: c.check() for c in cases}
        iterations = {c.algorithm: choose_iterations(c, warmup, min_time, max_iterations) for c in cases}
        times: dict[str, list[float]] = {c.algorithm: [] for c in cases}
        copies = []
        for round_ in range(repeats):
            # A fresh order every round (the same on every rank): no algorithm always runs
            # right after another one's cache footprint.
            for k in np.random.default_rng(round_).permutation(len(cases)):
                c = cases[k]
                times[c.algorithm].append(c.time_per_call(iterations[c.algorithm]))
            if single_node and p > 1:
                copies.append(copy_bandwidth(count * dtype.itemsize, comm, iterations["mpi"]))
        copy_bw = statistics.median(copies) if copies else None
        limit = bus_factor(p) * copy_bw / (1.5 * p) / 1e9 if copy_bw else None
        for c in cases:
            t = statistics.median(times[c.algorithm])
            ratios = [m / a for m, a in zip(times["mpi"], times[c.algorithm], strict=True)]
            algbw = size / t / 1e9
            rows.append(Row(
                size=count * dtype.itemsize, count=count, dtype=str(dtype), op=op,
                algorithm=c.algorithm, time_us=t * 1e6, algbw=algbw, busbw=algbw * bus_factor(p),
                wrong=wrong[c.algorithm], vs_mpi=statistics.median(ratios),
                limit_busbw=limit, copy_gbps=copy_bw / 1e9 if copy_bw else None,
            ))
        del cases
    return rows


def format_table(rows: list[Row], header: str) -> str:
    lines = [header, f"# {'size':>10} {'count':>10} {'algorithm':>18} {'time(us)':>11} {'algbw':>7} "
             f"{'busbw':>7} {'#wrong':>6} {'vs_mpi':>6} {'copy':>6} {'limit':>6} {'%limit':>6}",
             f"# {'(B)':>10} {'(elements)':>10} {'':>18} {'':>11} {'(GB/s)':>7} {'(GB/s)':>7} "
             f"{'':>6} {'':>6} {'(GB/s)':>6} {'(GB/s)':>6} {'':>6}"]
    for r in rows:
        copy = f"{r.copy_gbps:6.1f}" if r.copy_gbps else f"{'-':>6}"
        limit = f"{r.limit_busbw:6.2f}" if r.limit_busbw else f"{'-':>6}"
        frac = f"{100 * r.busbw / r.limit_busbw:5.0f}%" if r.limit_busbw else f"{'-':>6}"
        lines.append(f"  {r.size:>10} {r.count:>10} {r.algorithm:>18} {r.time_us:>11.2f} {r.algbw:>7.3f} "
                     f"{r.busbw:>7.3f} {r.wrong:>6} {r.vs_mpi:>6.2f} {copy} {limit} {frac}")
    for algorithm in dict.fromkeys(r.algorithm for r in rows):
        mine = [r.busbw for r in rows if r.algorithm == algorithm]
        lines.append(f"# Avg bus bandwidth {algorithm:>18} : {sum(mine) / len(mine):.3f} GB/s")
    return "\n".join(lines)


def format_markdown(rows: list[Row]) -> str:
    """One row per size: busbw and ratio to MPI per algorithm (for README tables)."""
    algorithms = list(dict.fromkeys(r.algorithm for r in rows))
    by = {(r.size, r.algorithm): r for r in rows}
    lines = ["| size | " + " | ".join(f"{a} busbw GB/s (vs mpi)" for a in algorithms) + " | limit GB/s |",
             "|---:|" + "---:|" * (len(algorithms) + 1)]
    for size in sorted({r.size for r in rows}):
        cells = []
        for a in algorithms:
            r = by[(size, a)]
            cell = f"{r.busbw:.2f} ({r.time_us:.1f} us)" if a == "mpi" else f"{r.busbw:.2f} ({r.vs_mpi:.2f}x)"
            if r.limit_busbw and a != "mpi" and size >= 1 << 20:
                cell += f" {100 * r.busbw / r.limit_busbw:.0f}% of limit"
            cells.append(cell)
        limit = f"{by[(size, 'mpi')].limit_busbw:.2f}" if by[(size, "mpi")].limit_busbw else "-"
        lines.append(f"| {format_size(size)} | " + " | ".join(cells) + f" | {limit} |")
    return "\n".join(lines)


def tuned_rules(rows: list[Row], margin: float = 1.02, stickiness: float = 1.05) -> list:
    """[[max_bytes, algorithm], ..., [None, algorithm]]: the fastest plain algorithm per size.

    A challenger replaces `mpi` only where it beats it by `margin` (median ratio);
    among algorithms within `stickiness` of the best, the previous size's choice
    is kept, so that noise does not fragment the table.
    """
    choices, previous = [], None
    for size in sorted({r.size for r in rows}):
        ratios = {r.algorithm: r.vs_mpi for r in rows
                  if r.size == size and r.algorithm in auto_table.HOST_ALGORITHMS}
        good = {a: v for a, v in ratios.items() if a == "mpi" or v >= margin}
        good["mpi"] = 1.0
        best = max(good.values())
        near = [a for a, v in good.items() if v * stickiness >= best]
        previous = previous if previous in near else max(near, key=good.get)
        choices.append((size, previous))
    rules: list = []
    for size, choice in choices:
        if rules and rules[-1][1] == choice:
            rules[-1][0] = size
        else:
            rules.append([size, choice])
    rules[-1][0] = None
    return rules


def machine_description() -> dict:
    from mpi4py import MPI

    topo = runtime.topology()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "mpi_library": MPI.Get_library_version().splitlines()[0].strip(),
        "ranks": runtime.size(),
        "nodes": topo.num_nodes,
        "ranks_per_node": list(topo.node_sizes),
        "pretended_nodes": topo.pretended,
    }


def main(args) -> int:
    """Entry point of `hpc-train bench allreduce` (args from the CLI parser)."""
    runtime.init()
    dtype = resolve_dtype(args.dtype)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a.removesuffix(SHARED_SUFFIX) not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"bench allreduce: unknown algorithm(s) {unknown}; choose from "
                         f"{ALGORITHMS} (append {SHARED_SUFFIX} for shared-memory input)")
    if runtime.topology().num_nodes > 1:
        algorithms = [a for a in algorithms if not a.startswith("shm")]
    sizes = sweep(args.begin, args.end, args.factor)
    rows = run(sizes, algorithms, dtype, args.op, args.repeats, args.warmup, args.min_time, args.iters)
    machine = machine_description()
    if runtime.rank() == 0:
        header = (f"# hpc-train bench allreduce: {machine['ranks']} ranks, {machine['nodes']} node(s) "
                  f"{machine['ranks_per_node']}, {dtype} {args.op}, median of {args.repeats} interleaved "
                  f"repeats\n# {machine['mpi_library']}\n# copy = aggregate np.copyto bandwidth of the "
                  f"node's ranks at this size; limit = 2(p-1)/p * copy / (1.5 p)")
        print(format_table(rows, header), flush=True)
        if args.markdown:
            print(format_markdown(rows), flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"benchmark": "allreduce", "machine": machine, "repeats": args.repeats,
                           "results": [asdict(r) for r in rows]}, f, indent=1)
            print(f"# wrote {args.json}")
    if args.tune:
        rules = tuned_rules(rows)
        if runtime.rank() == 0:
            key = auto_table.topology_key(runtime.topology())
            path = auto_table.save_table(args.tune_out or auto_table.USER_TABLE, key, rules,
                                         {"machine": machine, "dtype": str(dtype), "sizes":
                                          [format_size(s) for s in sizes]})
            print(f"# auto table for {key}: {rules} -> {path}")
        auto_table.agree(runtime.runtime().world)  # every rank now chooses by the new table
    return 0 if all(r.wrong == 0 for r in rows) else 1
