"""`hpc-train`: the command line, launched on every rank by mpirun or srun."""

from __future__ import annotations

import argparse
import json
import sys

from .units import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from .benchmarks.allreduce import ALGORITHMS

    parser = argparse.ArgumentParser(prog="hpc-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model described by a TOML job file")
    train.add_argument("job", help="job file, e.g. jobs/demo.toml")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a job key (repeatable), e.g. --set train.epochs=1")
    train.add_argument("--timeline", metavar="PATH", default="", help="write a Chrome trace of every rank")
    train.add_argument("--metrics", metavar="PATH", help="JSONL metrics file (overrides log.metrics)")

    info = sub.add_parser("info", help="MPI, node layout, CUDA-awareness, h5py, GPUs")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    bench = sub.add_parser("bench", help="collective benchmarks")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    ar = bench_sub.add_parser("allreduce", help="nccl-tests style allreduce sweep vs MPI")
    ar.add_argument("-b", "--begin", type=_size, default=parse_size("8"), help="smallest size (8, 4k, 1M)")
    ar.add_argument("-e", "--end", type=_size, default=parse_size("256M"), help="largest size")
    ar.add_argument("-f", "--factor", type=int, default=4, help="size multiplier between steps")
    ar.add_argument("-w", "--warmup", type=int, default=5, help="warm-up iterations per case")
    ar.add_argument("-n", "--iters", type=int, default=1000, help="most timed iterations per batch")
    ar.add_argument("--min-time", type=float, default=0.02, help="seconds one timed batch aims for")
    ar.add_argument("-r", "--repeats", type=int, default=5, help="interleaved rounds; medians reported")
    ar.add_argument("-d", "--dtype", default="float32", help="numpy dtype name, or bfloat16")
    ar.add_argument("-o", "--op", default="sum", choices=["sum", "mean", "max", "min", "prod"])
    ar.add_argument("-a", "--algorithms", default="mpi,ring,shm,shm+shared,auto",
                    help=f"comma list of {','.join(ALGORITHMS)}; +shared = input in shared memory")
    ar.add_argument("--json", metavar="PATH", help="write results as JSON")
    ar.add_argument("--markdown", action="store_true", help="also print a markdown summary table")
    ar.add_argument("--tune", action="store_true", help="derive the auto table from this sweep and save it")
    ar.add_argument("--tune-out", metavar="PATH", help="where --tune writes (default ~/.config/hpc_train/)")
    return parser


def run_train(args) -> int:
    from .train.config import JobFileError, load

    try:  # before MPI starts: a bad job file fails the same way on every rank, quickly
        job = load(args.job, args.set)
        if args.metrics is not None:
            job["log"]["metrics"] = args.metrics
        from . import runtime
        from .train.trainer import Trainer, summary_line

        trainer = Trainer(job, args.timeline or job["log"]["timeline"])
    except JobFileError as exc:
        print(f"hpc-train train: {exc}", file=sys.stderr)
        return 2
    summary = trainer.fit()
    if runtime.rank() == 0:
        print(summary_line(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return run_train(args)
    if args.command == "info":
        from . import info, runtime

        data = info.collect()
        if runtime.rank() == 0:
            print(json.dumps(data, indent=2) if args.json else info.format_table(data), flush=True)
        return 0
    if args.command == "bench" and args.benchmark == "allreduce":
        from .benchmarks import allreduce

        return allreduce.main(args)
    raise AssertionError("unreachable: argparse rejects unknown commands")


if __name__ == "__main__":
    sys.exit(main())
