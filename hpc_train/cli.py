"""`hpc-train`: the command line, launched on every rank by mpirun or srun."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from .units import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .comm import ALGORITHMS

    parser = argparse.ArgumentParser(prog="hpc-train", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hpc-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model described by a TOML job file")
    train.add_argument("job", help="job file, e.g. jobs/demo.toml")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a job key (repeatable), e.g. --set train.epochs=1")
    train.add_argument("--timeline", metavar="PATH", default="", help="write a Chrome trace of every rank")
    train.add_argument("--metrics", metavar="PATH", help="JSONL metrics file (overrides log.metrics)")
    train.add_argument("--elastic", action="store_true",
                       help="run plainly (not under mpirun): supervise the job through mpirun or srun and restart it "
                            "on the hosts that still answer after a failure (job section [elastic])")
    train.add_argument("--hostfile", metavar="PATH", help="--elastic: the hosts and slots (Open MPI's format)")

    sub.add_parser("keys", help="every job-file key: its type, default, valid values and meaning (Markdown)")

    data = sub.add_parser("data", help="write, convert and inspect HDF5 training datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    layout = argparse.ArgumentParser(add_help=False)
    layout.add_argument("--chunk-bytes", type=_size, default=parse_size("1M"), help="bytes per chunk (1M)")
    layout.add_argument("--contiguous", action="store_true", help="contiguous layout instead of chunks")
    layout.add_argument("--alignment", type=_size, help="align objects to this boundary (e.g. 1M)")
    synth = data_sub.add_parser("synth", parents=[layout], help="the synthetic learnable set, written in parallel")
    synth.add_argument("out")
    synth.add_argument("--samples", type=int, required=True)
    synth.add_argument("--shape", default="32,32,3", help="image shape, comma-separated (32,32,3)")
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--noise", type=float, default=1.0)
    synth.add_argument("--start", type=int, default=0,
                       help="index of the first sample: a validation set starts where training ends")
    convert = data_sub.add_parser("convert", help="convert another format into a dataset file")
    convert_sub = convert.add_subparsers(dest="format", required=True)
    cifar = convert_sub.add_parser("cifar10-binary", parents=[layout], help="CIFAR-10 binary batches")
    cifar.add_argument("directory")
    cifar.add_argument("out")
    cifar.add_argument("--split", choices=["train", "test"], default="train")
    npz = convert_sub.add_parser("npz", parents=[layout], help="images and labels arrays in an .npz")
    npz.add_argument("path")
    npz.add_argument("out")
    npz.add_argument("--images-key", default="images")
    npz.add_argument("--labels-key", default="labels")
    digits = convert_sub.add_parser("digits", parents=[layout],
                                    help="scikit-learn's 8x8 handwritten digits (needs scikit-learn)")
    digits.add_argument("out")
    digits.add_argument("--val", metavar="PATH", help="also write a held-out validation set")
    digits.add_argument("--val-fraction", type=float, default=0.2, help="with --val: share held out (0.2)")
    digits.add_argument("--seed", type=int, default=0, help="with --val: seed of the random split")
    text = convert_sub.add_parser("text", parents=[layout],
                                  help="text files as byte windows for a language model (default corpus: this "
                                       "Python's standard library sources)")
    text.add_argument("out")
    text.add_argument("sources", nargs="*", help="files or folders (default: the standard library of this Python)")
    text.add_argument("--glob", default="*.py", help="files to take from folders (*.py)")
    text.add_argument("--context", type=int, default=256, help="input bytes a window (256)")
    text.add_argument("--val", metavar="PATH", help="also write a validation set of whole held-out files")
    text.add_argument("--val-every", type=int, default=20, help="with --val: hold out every N-th file (20)")
    inspect = data_sub.add_parser("inspect", help="layout, chunking, sizes and a checksum")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")

    iob = sub.add_parser("iobench", help="fio-compatible I/O benchmark: run a fio job file", allow_abbrev=False,
                         epilog="Jobs can also be given as fio takes them on its command line, instead of a job "
                                "file: --name=NAME starts a job, --option=value sets its options (before the first "
                                "--name: every job's).")
    iob.add_argument("jobfile", nargs="?", help="fio job file (not with --workload train)")
    iob.add_argument("--workload", choices=["train"], help="emulate training I/O instead of a job file")
    iob.add_argument("--data", help="--workload train: the HDF5 dataset to read")
    iob.add_argument("--batch", type=int, default=32, help="--workload train: samples per rank and step")
    iob.add_argument("--compute-ms", type=float, default=10.0, help="--workload train: emulated compute per step")
    iob.add_argument("--epochs", type=int, default=1, help="--workload train: passes over the data")
    iob.add_argument("--independent", action="store_true", help="--workload train: independent, not collective")
    iob.add_argument("--output-format", choices=["normal", "json", "json+"], default="normal",
                     help="fio's: normal text, json, or json+ (json with each latency histogram's bins)")
    iob.add_argument("--output", metavar="PATH", help="write the report here instead of stdout")
    iob.add_argument("--overwrite", action="store_true",
                     help="allow writing files that hpc-train iobench did not create")
    iob.add_argument("--section", action="append", default=[], metavar="NAME",
                     help="run only the jobs of this [section] (repeatable), as fio's --section")

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

    scale = sub.add_parser("scale", help="strong/weak scaling study beside a calibrated cost model, or predictions "
                                         "(run it plainly: it launches mpirun or srun itself)")
    scale.add_argument("study", nargs="?", help="study file, e.g. jobs/scaling/mlp_weak.toml")
    scale.add_argument("--ranks", help="rank counts: 1,2,4 or 2,...,4096 (doubling)")
    which = scale.add_mutually_exclusive_group()
    which.add_argument("--strong", metavar="JOB", help="strong scaling of JOB (global batch fixed)")
    which.add_argument("--weak", metavar="JOB", help="weak scaling of JOB (per-rank batch fixed)")
    scale.add_argument("--repeats", type=int, help="runs per rank count (median kept)")
    scale.add_argument("--out", help="report folder (default results/scaling/<study>)")
    scale.add_argument("--resume", action="store_true",
                       help="continue the study in --out: the runs its runs.jsonl records are kept, not run again")
    scale.add_argument("--link", default="", help="network between nodes, e.g. 'alpha=2us,bw=12.5GB/s'")
    scale.add_argument("--predict", action="store_true", help="only predict (no runs)")
    scale.add_argument("--nodes-of", type=int, default=8, help="--predict: ranks per node (8)")
    scale.add_argument("--bench", action="append", default=[], metavar="JSON",
                       help="--predict: `hpc-train bench allreduce --json` output to fit (repeatable)")
    scale.add_argument("--from", dest="from_study", metavar="STUDY_JSON",
                       help="--predict: take the workload and fitted model from a study report")
    scale.add_argument("--params", type=float, help="--predict: parameter count (instead of --from)")
    scale.add_argument("--compute-ms-per-sample", type=float, help="--predict: compute time per sample")
    scale.add_argument("--batch", type=int, default=128, help="--predict: batch per rank (weak) or at 1 rank")
    scale.add_argument("--exposure", type=float, default=1.0,
                       help="--predict: step time added per second of reduction (0 hidden, 1 exposed)")
    scale.add_argument("--mode", choices=["weak", "strong"], default="weak", help="--predict with --params")
    scale.add_argument("--stage", type=int, choices=[0, 1, 2, 3], help="--predict: ZeRO stage")
    return parser


def run_train(args) -> int:
    from .checkpoint import CheckpointError
    from .io.hdf5 import DatasetError
    from .train.config import JobFileError, load

    try:  # before MPI starts: a bad job file fails the same way on every rank, quickly
        job = load(args.job, args.set)
        if args.metrics is not None:
            job = job.replace("log", metrics=args.metrics)
        if args.elastic:
            return run_elastic(args, job)
        from . import runtime
        from .train.trainer import Trainer, summary_line

        trainer = Trainer(job, args.timeline or job.log.timeline)
    except (JobFileError, DatasetError, CheckpointError) as exc:  # raised on every rank alike
        print(f"hpc-train train: {exc}", file=sys.stderr)
        return 2
    last = trainer.fit()
    if runtime.rank() == 0:
        print(summary_line(last), flush=True)
    return last.get("exit_code", 0)


def run_elastic(args, job) -> int:
    """The supervisor of `train --elastic`: no MPI here, the launcher starts the ranks."""
    from . import elastic

    try:
        hosts, launcher = elastic.launch_plan(args.hostfile)
    except (OSError, ValueError) as exc:
        print(f"hpc-train train --elastic: {exc}", file=sys.stderr)
        return 2
    forwarded = [args.job, *(x for s in args.set for x in ("--set", s))]
    forwarded += [*(["--metrics", args.metrics] if args.metrics else []),
                  *(["--timeline", args.timeline] if args.timeline else [])]
    return elastic.Supervisor(job, forwarded, hosts, launcher).run()


def run_data(args) -> int:
    from .io.hdf5 import DatasetError, describe

    try:
        if args.data_command == "inspect":
            report = describe(args.path)
            print(json.dumps(report, indent=2) if args.json else
                  "\n".join(f"{k}: {v}" for k, v in report.items()), flush=True)
            return 0
        write_dataset(args)
    except DatasetError as exc:
        print(f"hpc-train data: {exc}", file=sys.stderr)
        return 2
    return 0


def write_dataset(args) -> None:
    """data synth / data convert: every rank writes its slab of each file."""
    from . import runtime

    comm = runtime.init().world
    layout = {"chunk_bytes": args.chunk_bytes, "contiguous": args.contiguous, "alignment": args.alignment}
    writer = write_synthetic if args.data_command == "synth" else CONVERTERS[args.format]
    for path in writer(args, comm, layout):
        if comm.Get_rank() == 0:
            print(f"wrote {path}", flush=True)


def write_synthetic(args, comm, layout) -> list:
    from .data import synthetic_classification
    from .io.hdf5 import DatasetWriter

    shape = tuple(int(v) for v in args.shape.split(","))
    writer = DatasetWriter(args.out, args.samples, shape, comm, classes=args.classes, **layout,
                           provenance={"generator": "hpc_train synthetic", "seed": args.seed,
                                       "noise": args.noise, "start": args.start})
    lo, hi = writer.slab()
    images, labels = synthetic_classification(hi - lo, shape, args.classes, args.seed, args.noise,
                                              start=args.start + lo)
    writer.write(lo, images, labels)
    return [writer.close()]


def convert_cifar10(args, comm, layout) -> list:
    from .io.convert import read_cifar10_binary
    from .io.hdf5 import write_arrays

    images, labels, names = read_cifar10_binary(args.directory, args.split)
    source = {"source": f"cifar10-binary {args.directory} ({args.split})"}
    return [write_arrays(args.out, images, labels, comm, classes=10, class_names=names, provenance=source,
                         **layout)]


def convert_npz(args, comm, layout) -> list:
    import numpy as np

    from .io.convert import read_npz
    from .io.hdf5 import write_arrays

    images, labels = read_npz(args.path, args.images_key, args.labels_key)
    classes = int(np.max(labels)) + 1 if len(labels) else 0
    return [write_arrays(args.out, images, labels, comm, classes=classes, provenance={"source": f"npz {args.path}"},
                         **layout)]


def convert_digits(args, comm, layout) -> list:
    """scikit-learn's digits; with --val, a seeded random share held out into a second set."""
    from .io.convert import held_out, read_digits
    from .io.hdf5 import write_arrays

    images, labels = read_digits()
    kept, held = held_out(len(labels), args.val_fraction if args.val else 0.0, args.seed)
    written = []
    for path, rows in ((args.out, kept), (args.val, held)):
        if path:
            provenance = {"source": "sklearn.datasets.load_digits, pixels / 16", "samples": len(rows),
                          "split": f"{args.val_fraction} held out, seed {args.seed}" if args.val else "none"}
            written.append(write_arrays(path, images[rows], labels[rows], comm, classes=10, provenance=provenance,
                                        **layout))
    return written


def convert_text(args, comm, layout) -> list:
    """Byte windows of text files; with --val, whole files held out into a second set."""
    import platform

    from .io.convert import byte_windows, split_every, stdlib_folder, text_files
    from .io.hdf5 import DatasetError, write_arrays

    sources = args.sources or [stdlib_folder()]
    files = text_files(sources, args.glob)
    parts = dict(zip((args.out, args.val), split_every(files, args.val_every if args.val else 0), strict=False))
    if args.val and not parts[args.val]:
        raise DatasetError(f"--val {args.val}: {len(files)} files, every {args.val_every}th held out, leaves none "
                           "for validation")
    written = []
    for path, part in parts.items():
        provenance = {"source": " ".join(map(str, sources)), "glob": args.glob, "files": len(part),
                      "bytes": sum(f.stat().st_size for f in part), "context": args.context,
                      "python": platform.python_version(), "separator": 0,
                      "split": f"every {args.val_every}th file held out" if args.val else "none"}
        written.append(write_arrays(path, byte_windows(part, args.context), None, comm, classes=256,
                                    provenance=provenance, **layout))
    return written


CONVERTERS = {"cifar10-binary": convert_cifar10, "npz": convert_npz, "digits": convert_digits, "text": convert_text}


def run_training_io(args) -> int:
    import time

    from . import __version__, runtime
    from .data.workload import aggregate, run_training_io
    from .io.hdf5 import DatasetError

    if not args.data:
        print("hpc-train iobench: --workload train needs --data FILE.h5", file=sys.stderr)
        return 2
    comm = runtime.init().world
    try:
        mine = run_training_io(args.data, args.batch, args.compute_ms, comm, epochs=args.epochs,
                               collective=not args.independent)
    except DatasetError as exc:  # raised on every rank alike
        print(f"hpc-train iobench: {exc}", file=sys.stderr)
        return 2
    per_rank = comm.gather(mine, root=0)
    if comm.Get_rank() == 0:
        total = aggregate(per_rank)
        doc = {"fio version": f"hpc-train-iobench-{__version__}", "timestamp": int(time.time()),
               "time": time.ctime(), "workload": {"name": "train", "data": args.data, "batch": args.batch,
                                                  "compute_ms": args.compute_ms, "epochs": args.epochs,
                                                  "collective": not args.independent,
                                                  "per_rank": per_rank, "aggregate": total}}
        text = json.dumps(doc, indent=2) if args.output_format == "json" else (
            f"training I/O on {total['ranks']} ranks: {total['samples_per_s']:.0f} samples/s, "
            f"{total['mb_per_s']:.1f} MB/s, AU min {total['au_min']:.3f} mean {total['au_mean']:.3f} "
            f"({'meets' if total['meets_dlio_expectation'] else 'below'} DLIO's 0.90)")
        if args.output:
            Path(args.output).write_text(text + "\n")
        else:
            print(text, flush=True)
    return 0


def run_iobench(args) -> int:
    from . import __version__, runtime
    from .errors import JobFileError
    from .io import diskstats, fiojob, fiolog, iobench

    if args.workload == "train":
        return run_training_io(args)
    if args.jobfile and args.job_options:
        print(f"hpc-train iobench: give a job file or jobs as fio options (--name=NAME --rw=...), not both "
              f"({args.jobfile} and {' '.join(args.job_options)})", file=sys.stderr)
        return 2
    if not args.jobfile and not args.job_options:
        print("hpc-train iobench: give a fio job file, jobs as fio options (--name=NAME --rw=... --size=...), "
              "or --workload train", file=sys.stderr)
        return 2
    try:  # before MPI starts, on every rank alike
        jobfile = fiojob.load(args.jobfile) if args.jobfile else fiojob.from_command_line(args.job_options)
        if args.section:
            jobfile.select(args.section)
    except JobFileError as exc:
        print(f"hpc-train iobench: {exc}", file=sys.stderr)
        return 2
    comm = runtime.init().world
    if comm.Get_rank() == 0:
        for note in jobfile.ignored:
            print(f"hpc-train iobench: {note}", file=sys.stderr)
    try:
        mine = iobench.assign(iobench.instances(jobfile.jobs), comm)
    except JobFileError as exc:  # every rank finds the same problem
        print(f"hpc-train iobench: {exc}", file=sys.stderr)
        return 2
    results, problem, disks = [], None, []
    try:
        iobench.check_space(mine, comm)  # collective: the same verdict on every rank
        iobench.prepare(mine, args.overwrite)
    except (iobench.IOBenchError, OSError) as exc:
        problem = str(exc)
    problems = [p for p in comm.allgather(problem) if p]
    if not problems:  # everyone laid out: the levels start together on every rank
        results, problems, disks = iobench.run_watched(mine, sorted({job.level for job in jobfile.jobs}), comm,
                                                       exitall=any(job.options["exitall"] for job in jobfile.jobs))
    gathered = comm.gather((results, socket.gethostname(), disks), root=0)
    comm.Barrier()  # every rank is done with the files
    iobench.unlink_files(mine)
    if comm.Get_rank() != 0:
        return 0 if not problems else 1
    if problems:
        print("\n".join(f"hpc-train iobench: {p}" for p in sorted(set(problems))), file=sys.stderr)
        return 1
    results = [r for rs, _, _ in gathered for r in rs]
    try:
        fiolog.write_logs(results)
    except OSError as exc:
        print(f"hpc-train iobench: cannot write a log file: {exc}", file=sys.stderr)
        return 1
    doc = iobench.report(results, jobfile, f"hpc-train-iobench-{__version__}",
                         diskstats.merge([(host, entries) for _, host, entries in gathered]),
                         bins=args.output_format == "json+")
    text = iobench.text_report(doc) if args.output_format == "normal" else json.dumps(doc, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "iobench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.job_options = extra
    if args.command == "iobench":
        return run_iobench(args)
    if args.command == "train":
        return run_train(args)
    if args.command == "data":
        return run_data(args)
    if args.command == "keys":
        from .train.config import reference

        print(reference(), end="")
        return 0
    if args.command == "info":
        from . import info, runtime

        data = info.collect()
        if runtime.rank() == 0:
            print(json.dumps(data, indent=2) if args.json else info.format_table(data), flush=True)
        return 0
    if args.command == "scale":
        from .scaling import command
        from .train.config import JobFileError

        try:
            return command.main(args)
        except (JobFileError, ValueError) as exc:
            print(f"hpc-train scale: {exc}", file=sys.stderr)
            return 2
    if args.command == "bench" and args.benchmark == "allreduce":
        from .benchmarks import allreduce

        return allreduce.main(args)
    raise AssertionError("unreachable: argparse rejects unknown commands")


if __name__ == "__main__":
    sys.exit(main())
