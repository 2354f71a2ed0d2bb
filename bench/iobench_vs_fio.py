"""hpc-train iobench against fio on the same job files, interleaved, median of repeats.

    python bench/iobench_vs_fio.py [--repeats 3] [--dir results/iobench] [--json results/iobench_vs_fio.json]

Cases, each run by fio and by us on the same job file for 5 s, back to back (which goes first
alternates between rounds); a ratio is the median over rounds of ours / fio's within the round:
sequential 1 MiB direct reads (bandwidth) with psync and at iodepth 8 with libaio and io_uring,
4 KiB direct random reads (IOPS) with psync and at iodepth 1, 8 and 32 with libaio and io_uring. Then a
collective HDF5 read of a contiguous 1 GiB dataset against our psync engine reading
the same number of bytes, and the training-I/O mode's accelerator utilization when
compute per step exceeds read time. Files live under --dir, on the working tree's
file system.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_mpi_yield_when_idle": "1", "OMPI_MCA_rmaps_base_oversubscribe": "true"}
CLI = [sys.executable, "-m", "hpc_train.cli"]


def job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_json(cmd: list[str], timeout: int = 600) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **MPI_ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def ours(jobfile: Path, ranks: int = 1) -> dict:
    prefix = ["mpirun", "-n", str(ranks)] if ranks > 1 else []
    return run_json(prefix + CLI + ["iobench", str(jobfile), "--output-format", "json", "--overwrite"])


def fio(jobfile: Path) -> dict:
    return run_json(["fio", "--output-format=json", str(jobfile)])


def total(doc: dict, direction: str, field: str) -> float:
    """Group figure: bandwidth sums over jobs (bytes / longest runtime), IOPS sums."""
    entries = [j[direction] for j in doc["jobs"] if j[direction]["total_ios"]]
    if field == "bw_bytes":
        return 1000 * sum(e["io_bytes"] for e in entries) / max(e["runtime"] for e in entries)
    return sum(e[field] for e in entries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="results/iobench")
    parser.add_argument("--ranks", type=int, default=2, help="ranks for the HDF5 and training-I/O cases")
    parser.add_argument("--json", default="results/iobench_vs_fio.json")
    args = parser.parse_args()
    if shutil.which("fio") is None:
        print("fio is not installed (apt-get install fio)", file=sys.stderr)
        return 1
    d = Path(args.dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    # every paired case runs 5 s (time_based): a 1 GiB pass at ~1 GB/s was a one-second run, within
    # the noise of this disk
    seq = job(d / "seq.fio", f"[global]\nioengine=psync\ndirect=1\nfilename={d}/seq.dat\n[seq]\nrw=read\nbs=1m\n"
                             "size=1g\nruntime=5\ntime_based\n")
    rand = job(d / "rand.fio", f"[global]\nioengine=psync\ndirect=1\nfilename={d}/rand.dat\n[rand]\nrw=randread\n"
                               "bs=4k\nsize=1g\nruntime=5\ntime_based\n")
    # (label, job file, field): fio and ours run each, interleaved
    paired = [("seqread 1M direct", seq, "bw_bytes"), ("randread 4k direct", rand, "iops")]
    for engine in ("libaio", "io_uring"):
        paired.append((f"seqread 1M direct {engine} iodepth 8", job(
            d / f"seq-{engine}.fio", f"[global]\nioengine={engine}\niodepth=8\ndirect=1\nfilename={d}/seq.dat\n"
                                     "[seq]\nrw=read\nbs=1m\nsize=1g\nruntime=5\ntime_based\n"), "bw_bytes"))
        for depth in (1, 8, 32):
            paired.append((f"randread 4k direct {engine} iodepth {depth}", job(
                d / f"rand-{engine}-{depth}.fio", f"[global]\nioengine={engine}\niodepth={depth}\ndirect=1\n"
                                                  f"filename={d}/rand.dat\n[rand]\nrw=randread\nbs=4k\nsize=1g\n"
                                                  "runtime=5\ntime_based\n"), "iops"))
    n = args.ranks
    h5 = job(d / "h5.fio", f"[global]\nbs=1m\nsize={1024 // n}m\noffset_increment={1024 // n}m\nnumjobs={n}\n"
                           f"[h5]\nioengine=hdf5\nrw=read\ncollective=1\nfilename={d}/h5.h5\n")
    raw = job(d / "raw.fio", f"[global]\nbs=1m\nsize={1024 // n}m\noffset_increment={1024 // n}m\nnumjobs={n}\n"
                             f"[raw]\nioengine=psync\nrw=read\nfilename={d}/raw.dat\n")
    rows: dict[str, list[float]] = {}
    round_ratios: dict[str, list[float]] = {}
    for round_number in range(args.repeats):  # interleaved: each round runs every side once, in turn first
        for label, jobfile, field in paired:
            unit, scale = ("GB/s", 1e9) if field == "bw_bytes" else ("IOPS", 1)
            sides = [("fio", fio), ("ours", ours)][:: 1 if round_number % 2 == 0 else -1]
            figures = {side: total(run(jobfile), "read", field) / scale for side, run in sides}
            for side, figure in figures.items():
                rows.setdefault(f"{label}: {side} {unit}", []).append(figure)
            round_ratios.setdefault(f"{label} ours/fio", []).append(figures["ours"] / figures["fio"])
        rows.setdefault(f"hdf5 collective contiguous read, {n} ranks: GB/s", []).append(
            total(ours(h5, n), "read", "bw_bytes") / 1e9)
        rows.setdefault(f"psync read of the same bytes, {n} ranks: GB/s", []).append(
            total(ours(raw, n), "read", "bw_bytes") / 1e9)
    data = d / "train.h5"
    subprocess.run(["mpirun", "-n", str(n)] + CLI + ["data", "synth", str(data), "--samples", "20000",
                                                      "--contiguous"], check=True, capture_output=True,
                   env={**os.environ, **MPI_ENV}, timeout=600)
    for _ in range(args.repeats):
        doc = run_json(["mpirun", "-n", str(n)] + CLI + ["iobench", "--workload", "train", "--data", str(data),
                                                          "--batch", "64", "--compute-ms", "10",
                                                          "--output-format", "json"])
        rows.setdefault(f"training I/O, {n} ranks, 64 x 3 KiB samples, 10 ms compute: AU", []).append(
            doc["workload"]["aggregate"]["au_min"])
    medians = {k: statistics.median(v) for k, v in rows.items()}
    # the disk's speed moves several-fold between minutes: ratios within a round, then their median
    ratios = {key: statistics.median(values) for key, values in round_ratios.items()}
    ratios |= {
        "hdf5/psync": medians[f"hdf5 collective contiguous read, {n} ranks: GB/s"]
        / medians[f"psync read of the same bytes, {n} ranks: GB/s"],
    }
    print(f"# median of {args.repeats} interleaved runs, files in {d}")
    for key, value in medians.items():
        print(f"{key:<70} {value:12.3f}   (runs: {', '.join(f'{v:.3f}' for v in rows[key])})")
    for key, value in ratios.items():
        runs = f"   (rounds: {', '.join(f'{v:.2f}' for v in round_ratios[key])})" if key in round_ratios else ""
        print(f"{key:<70} {value:12.2f}{runs}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"medians": medians, "runs": rows, "ratios": ratios}, indent=1))
    print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
