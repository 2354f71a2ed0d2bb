"""`hpc-train iobench`: run fio job files, report in fio's text and JSON formats.

All job instances start together, as fio starts them: `numjobs` copies of each job
are spread over the MPI ranks (round-robin) and run as threads on their rank
(without mpirun: all threads of one process). Files are laid out before read jobs
as fio does; a file the benchmark did not create (no `NAME.hpc_train-iobench`
marker beside it) is never written to without `--overwrite`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import resource
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import diskstats
from .engines import ENGINES, EngineUnavailable, Stamps, create_hdf5_file
from .exits import EXIT_CHECK_BYTES, ExitBoard
from .files import FileRegion, FileSet, file_names, region_lengths
from .fiojob import Job
from .iostats import (
    call_sizes,
    depth_levels,
    histogram_bins,
    latency_distribution,
    percentiles,
    summary,
    windowed_rates,
)
from .pattern import CHUNK, Pacer, chunks
from .verify import Verifier, VerifyUnavailable

MARKER_SUFFIX = ".hpc_train-iobench"
READ, WRITE = 0, 1


class IOBenchError(RuntimeError):
    """A job that cannot run as asked (file, option and reason named)."""


@dataclass
class Instance:
    job: Job
    jobnum: int
    files: list  # FileRegion: the copy's files (several with nrfiles= or filename=a:b)
    number: int = 1  # fio's job number (1, 2, ... over every copy of every job): names its log files
    comm: object = None  # mpiio / hdf5: the communicator the file is opened on

    @property
    def owned(self) -> list:
        """The files this copy lays out, checks and unlinks (the first copy that uses a file)."""
        return [f for f in self.files if f.owner]

    def __getstate__(self):  # results travel to rank 0 without the (unpicklable) communicator
        return {**self.__dict__, "comm": None}


@dataclass
class Result:
    """One instance's I/Os: direction, completion and submission latency (ns; slat empty where the
    engine has no submission step), completion time (s after start), bytes; its syncs; the I/Os
    in flight at each commit and the I/Os each submit and reap call carried."""

    instance: Instance
    kinds: np.ndarray
    clat_ns: np.ndarray
    slat_ns: np.ndarray
    completed_s: np.ndarray
    sizes: np.ndarray
    sync_ns: np.ndarray
    runtime_s: float
    rusage: dict = field(default_factory=dict)
    depth: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    submit_calls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    complete_calls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def lat_ns(self) -> np.ndarray:
        """fio's lat: set up to reaped (clat alone where slat is not measured)."""
        return self.clat_ns + self.slat_ns if len(self.slat_ns) else self.clat_ns


def instances(jobs: list[Job]) -> list[Instance]:
    """Every job's numjobs copies with their files (io/files.py: names in `directory`, regions
    from the copy's offset); a file that several copies use is laid out, by the first, to the
    end of the furthest region in it. The same on every rank (seeded)."""
    out, extents = [], {}
    for job in jobs:
        o = job.options
        for k in range(o["numjobs"]):
            start = o["offset"] + k * o["offset_increment"]
            paths = [Path(o["directory"] or ".") / name for name in file_names(job, k)]
            rng = np.random.default_rng([o["randseed"], job.index, k, 1])  # filesize=LOW-HIGH draws
            regions = [FileRegion(path, start, length) for path, length in
                       zip(paths, region_lengths(o, len(paths), start, rng), strict=True)]
            for region in regions:
                region.owner = region.path not in extents
                extents[region.path] = max(extents.get(region.path, 0), region.start + region.length,
                                           o["filesize"][1] if o["filesize"] else 0)
            out.append(Instance(job, k, regions, number=len(out) + 1))
    for inst in out:
        for region in inst.files:
            region.extent = extents[region.path]
    return out


def assign(all_instances: list[Instance], comm) -> list[Instance]:
    """This rank's instances (round-robin), each with the communicator its engine opens files on.

    Collective jobs need one copy per rank (numjobs == ranks) on a communicator of their
    own; independent mpiio / hdf5 copies open their file alone (COMM_SELF).
    """
    from mpi4py import MPI

    from ..errors import JobFileError

    size = comm.Get_size()
    for job in {inst.job.name: inst.job for inst in all_instances}.values():
        if job.options["collective"] and job.options["numjobs"] != size:
            raise JobFileError(f"{job.source}:{job.line}: job '{job.name}': collective=1 needs numjobs equal to "
                               f"the number of ranks ({size}), got {job.options['numjobs']}")
    job_comms = {}
    for inst in all_instances:  # in the same order on every rank: Dup is collective
        if inst.job.options["collective"] and inst.job.name not in job_comms:
            job_comms[inst.job.name] = comm.Dup()
    mine = all_instances[comm.Get_rank() :: size]
    for inst in mine:
        if not ENGINES[inst.job.options["ioengine"]].on_fd:
            inst.comm = job_comms.get(inst.job.name, MPI.COMM_SELF)
    return mine


def _is_ours(path: Path) -> bool:
    return Path(str(path) + MARKER_SUFFIX).exists()


def _claim(path: Path) -> None:
    Path(str(path) + MARKER_SUFFIX).write_text("created by hpc-train iobench\n")


def check_writable(inst: Instance, path: Path, overwrite: bool) -> None:
    if path.exists() and not _is_ours(path) and not overwrite:
        raise IOBenchError(f"{inst.job.source}:{inst.job.line}: job '{inst.job.name}' would write {path}, "
                           "which hpc-train iobench did not create; pass --overwrite to allow it")


def writes(job: Job) -> bool:
    return job.options["rw"] in ("write", "randwrite", "rw", "randrw")


def layout_bytes(inst: Instance, region: FileRegion) -> int:
    """What layout() will add to the file system for this file (0 for a file already there)."""
    path = region.path
    if not region.owner or not ENGINES[inst.job.options["ioengine"]].needs_file:
        return 0
    if inst.job.options["ioengine"] == "hdf5":
        return 0 if path.exists() and _is_ours(path) else region.extent
    return max(0, region.extent - (path.stat().st_size if path.exists() else 0))


def mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, file system type, source) of the mount that holds `path` (/proc/self/mountinfo)."""
    target, found = os.path.realpath(path), ("/", "", "")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        tail = fields.index("-")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # a space is \040
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(found[0]):  # the innermost; of equal ones the later, which hides the other
            found = (point, fields[tail + 1], fields[tail + 2])
    return found


# File systems that every node sees as one: what ranks on different hosts write there adds up.
SHARED_FILE_SYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs", "panfs",
                       "wekafs", "pvfs2", "orangefs", "fuse.ceph", "fuse.glusterfs", "fuse.sshfs")


def _my_demands(mine: list[Instance]) -> dict:
    """This rank's layout bytes by file system: key -> [bytes, free bytes, where, job names]."""
    demands: dict = {}
    for inst, region in ((copy, region) for copy in mine for region in copy.files):
        nbytes = layout_bytes(inst, region)
        if not nbytes:
            continue
        directory = region.path.parent.resolve()
        while not directory.exists():  # layout creates the missing folders
            directory = directory.parent
        point, fstype, source = mount_of(directory)
        if fstype in SHARED_FILE_SYSTEMS:
            key, where = (fstype, source, point), f"{point} ({fstype} {source})"
        else:
            host = socket.gethostname()
            key, where = (host, fstype, source, point), f"{point} ({fstype} {source}, on {host})"
        stats = os.statvfs(directory)
        entry = demands.setdefault(key, [0, stats.f_bavail * stats.f_frsize, where, set()])
        entry[0] += nbytes
        entry[3].add(inst.job.name)
    return demands


def check_space(mine: list[Instance], comm) -> None:
    """Refuse, on every rank, a layout that would not fit (collective): the bytes every rank's
    instances would add to one file system (one per host for local ones, one for all hosts for
    shared ones such as NFS or Lustre), against what it has free. fio would fill the disk."""
    try:
        demands, problem = _my_demands(mine), None
    except OSError as exc:
        demands, problem = {}, f"rank {comm.Get_rank()}: {exc}"
    everyone = comm.allgather((demands, problem))
    problems = [p for _, p in everyone if p]
    if problems:
        raise IOBenchError("; ".join(problems))
    totals: dict = {}
    for rank, (rank_demands, _) in enumerate(everyone):
        for key, (nbytes, free, where, jobs) in rank_demands.items():
            total = totals.setdefault(key, {"bytes": 0, "free": free, "where": where, "ranks": [], "jobs": set()})
            total["bytes"] += nbytes
            total["free"] = min(total["free"], free)
            total["ranks"].append(rank)
            total["jobs"] |= jobs
    for total in totals.values():
        if total["bytes"] > total["free"]:
            raise IOBenchError(
                f"job(s) {', '.join(sorted(total['jobs']))} would lay out {_human_bytes(total['bytes'])} on "
                f"{total['where']} (rank(s) {', '.join(map(str, total['ranks']))}), which has "
                f"{_human_bytes(total['free'])} free; lower size or numjobs, or use another directory")


def layout(inst: Instance, region: FileRegion, overwrite: bool) -> None:
    """Create and fill a file up to its extent before a job reads it (fio lays files out too).

    A file several copies use is laid out by the first of them alone.
    """
    o, path, needed = inst.job.options, region.path, region.extent
    if not region.owner or not ENGINES[o["ioengine"]].needs_file:
        return
    if o["ioengine"] == "hdf5":
        if not path.exists() or not _is_ours(path):
            check_writable(inst, path, overwrite)
            path.parent.mkdir(parents=True, exist_ok=True)
            _claim(path)
            create_hdf5_file(path, needed, o["hdf5_chunk"])
        return
    if path.exists() and path.stat().st_size >= needed:
        return
    check_writable(inst, path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim(path)
    block = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    with open(path, "r+b" if path.exists() else "wb") as f:
        allocate(f.fileno(), needed, o["fallocate"])
        f.seek(0, os.SEEK_END)
        while f.tell() < needed:
            f.write(block[: needed - f.tell()])
        f.flush()
        os.fsync(f.fileno())


FALLOC_FL_KEEP_SIZE = 1


def allocate(fd: int, nbytes: int, mode: str) -> None:
    """fio's fallocate= before a file is filled: posix_fallocate, fallocate(2) plain (native) or
    keeping the size (keep), ftruncate (truncate), or nothing (none). Where the file system has
    no fallocate(2) (EOPNOTSUPP), native and keep do nothing, as fio goes on without."""
    if mode == "posix":
        os.posix_fallocate(fd, 0, nbytes)
    elif mode == "truncate":
        os.ftruncate(fd, max(nbytes, os.fstat(fd).st_size))
    elif mode in ("native", "keep"):
        libc = ctypes.CDLL(None, use_errno=True)
        flags = FALLOC_FL_KEEP_SIZE if mode == "keep" else 0
        if libc.fallocate(fd, flags, ctypes.c_long(0), ctypes.c_long(nbytes)) != 0:
            err = ctypes.get_errno()
            if err != errno.EOPNOTSUPP:
                raise OSError(err, os.strerror(err))


def seed(inst: Instance):
    """The copy's random seed: randseed, the job and the copy (the same offsets on every run:
    randrepeat=1); collective copies share one (every rank issues the same I/Os in the same
    order); randrepeat=0 takes a fresh seed from the system."""
    o = inst.job.options
    if not o["randrepeat"]:
        return None
    return [o["randseed"], inst.job.index, 0 if o["collective"] else inst.jobnum]


VERIFY_CHUNK_BYTES = 16 << 20  # verify keeps a block per I/O of a run: runs of at most this many bytes


def _issue(engine, inst: Instance, run: tuple, view, deadline: int) -> Stamps:
    """One run (offsets, reads, sizes, files) on the engine; IOBenchError naming file, offset and
    errno for a failed I/O."""
    offsets, reads, sizes, files = run
    stamps = engine.run(offsets, reads, sizes, files, view, inst.job.options["bs_max"], deadline)
    failed = np.nonzero(stamps.result != sizes[: len(stamps.result)])[0]
    if len(failed):
        k, res = failed[0], int(stamps.result[failed[0]])
        raise IOBenchError(f"{inst.files[files[k]].path}: {'read' if reads[k] else 'write'} at offset {offsets[k]} "
                           "failed: "
                           + (os.strerror(-res) if res < 0 else f"short, {res} of {sizes[k]} bytes"))
    return stamps


def _blocks(run: tuple, view, stride: int, reading: bool):
    """(block, offset, file) of a run's reads or writes, each I/O's block at its place in the buffer."""
    offsets, reads, sizes, files = run
    for k in np.flatnonzero(reads if reading else ~reads).tolist():
        yield view[k * stride : k * stride + int(sizes[k])], int(offsets[k]), int(files[k])


def _check(verifier: Verifier, inst: Instance, run: tuple, view, generation) -> None:
    for block, offset, file in _blocks(run, view, inst.job.options["bs_max"], reading=True):
        with block:
            problem = verifier.check(block, offset, inst.files[file].path, generation)
        if problem:
            raise IOBenchError(problem)


def _written_once(offsets: np.ndarray, sizes: np.ndarray, files: np.ndarray, unit: int) -> tuple:
    """The writes a read-back must find, in the order of their last write: each block's last
    write, and no earlier write that a later one overlapped even in part (its block is no longer
    whole: fio drops such pieces from its verify list too). Files are laid end to end for this."""
    span = -(-int((offsets + sizes).max()) // unit) * unit if len(offsets) else 0
    place = offsets + files * span
    first = int(place.min()) if len(place) else 0
    taken = np.zeros((int((place + sizes).max()) - first) // unit + 1 if len(place) else 0, bool)
    keep = []
    for k in range(len(place) - 1, -1, -1):  # latest first
        lo, hi = (int(place[k]) - first) // unit, -(-(int(place[k] + sizes[k]) - first) // unit)
        if not taken[lo:hi].any():
            keep.append(k)
        taken[lo:hi] = True
    keep = np.array(keep[::-1], np.int64)
    return offsets[keep], np.ones(len(keep), bool), sizes[keep], files[keep]


@dataclass
class _Record:
    """What a job copy's runs did, in order: their stamps, directions, offsets, sizes and files."""

    stamps: list = field(default_factory=list)
    kinds: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    files: list = field(default_factory=list)

    def add(self, stamps: Stamps, run: tuple) -> None:
        offsets, reads, sizes, files = (column[: len(stamps.set_up)] for column in run)
        self.stamps.append(stamps)
        self.kinds.append(np.where(reads, READ, WRITE).astype(np.int8))
        self.offsets.append(offsets)
        self.sizes.append(sizes)
        self.files.append(files)

    def joined(self, name: str, dtype=np.int64) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.zeros(0, dtype)


def run_instance(inst: Instance, start_barrier: threading.Barrier, board: ExitBoard | None = None) -> Result:
    """Run one job copy: its I/Os in runs on its engine, paced and synced as asked, then (verify=
    on a write job) the read-back of every block it wrote, counted as reads as fio counts them;
    with exitall (`board`), until another copy's end stops it."""
    o = inst.job.options
    stride = o["bs_max"]  # a buffer of one block, or (verify) of a block per I/O of a run
    try:
        engine = ENGINES[o["ioengine"]]([region.path for region in inst.files], o, writes(inst.job), inst.comm)
        verifier = Verifier(o["verify"], int.from_bytes(os.urandom(8), "little")) if o["verify"] != "none" \
            else None
    except (EngineUnavailable, VerifyUnavailable) as exc:
        raise IOBenchError(f"{inst.job.source}:{inst.job.line}: job '{inst.job.name}': {exc}") from None
    except OSError as exc:
        raise IOBenchError(f"{inst.job.source}:{inst.job.line}: job '{inst.job.name}': cannot open "
                           f"{exc.filename or inst.files[0].path}: {exc.strerror or exc}") from None
    rng = np.random.default_rng(seed(inst))
    mix = {"read": 1.0, "randread": 1.0, "write": 0.0, "randwrite": 0.0}.get(o["rw"], o["rwmixread"] / 100)
    pacer = Pacer(o, rng)
    chunk = pacer.chunk() if pacer.active else CHUNK
    chunk = min(chunk, max(1, VERIFY_CHUNK_BYTES // stride)) if verifier else chunk
    chunk = min(chunk, max(1, EXIT_CHECK_BYTES // stride)) if board else chunk

    def stopped() -> bool:
        return board is not None and board.stopped(inst.job)

    blocks = chunk if verifier else 1
    buffer = mmap.mmap(-1, blocks * stride)  # page-aligned, as O_DIRECT requires
    buffer.write(np.random.default_rng(inst.jobnum).integers(0, 256, stride, dtype=np.uint8).tobytes() * blocks)
    view = memoryview(buffer)
    record, syncs = _Record(), []
    usage_before = resource.getrusage(resource.RUSAGE_THREAD)
    start_barrier.wait()
    low, high = o["startdelay"]
    if not stopped():  # fio drops a stopped job's start delay
        time.sleep(rng.uniform(low, high) if high > low else low)
    start = time.perf_counter_ns()
    deadline = start + int(1e9 * (o["ramp_time"] + o["runtime"])) if o["runtime"] else 0
    try:
        for *run, sync_first in chunks(o, FileSet(o, inst.files, rng), mix, chunk):
            if stopped():
                break
            if pacer.active:
                pacer.wait(run[1], run[2], start)
            if sync_first:
                s0 = time.perf_counter_ns()
                engine.sync(data_only=bool(o["fdatasync"]))
                syncs.append(time.perf_counter_ns() - s0)
            if verifier:
                for block, offset, _ in _blocks(run, view, stride, reading=False):
                    with block:  # released now: the buffer is closed at the end
                        verifier.stamp(block, offset)
            stamps = _issue(engine, inst, run, view, deadline)
            if verifier:
                _check(verifier, inst, tuple(column[: len(stamps.set_up)] for column in run), view, None)
            record.add(stamps, run)
            if len(stamps.set_up) < len(run[0]) or (deadline and time.perf_counter_ns() >= deadline):
                break
        if o["end_fsync"] and writes(inst.job):
            engine.sync()
        if verifier and o["do_verify"] and writes(inst.job) and not stopped():
            written = _written_once(*(record.joined(name) for name in ("offsets", "sizes", "files")), o["bs"])
            for lo in range(0, len(written[0]), chunk):
                run = tuple(column[lo : lo + chunk] for column in written)
                stamps = _issue(engine, inst, run, view, 0)
                _check(verifier, inst, run, view, verifier.generation)
                record.add(stamps, run)
    finally:
        elapsed = time.perf_counter_ns() - start
        usage_after = resource.getrusage(resource.RUSAGE_THREAD)
        engine.close()
        view.release()
        buffer.close()
    if board:
        board.finished(inst.job)
    stamps = Stamps(*(np.concatenate([getattr(r, f) for r in record.stamps]) if record.stamps
                      else np.zeros(0, np.int64) for f in Stamps.__dataclass_fields__))
    counted = stamps.reaped - start >= int(1e9 * o["ramp_time"])  # what ends after the ramp is measured
    runtime = max(elapsed / 1e9 - o["ramp_time"], 1e-9)
    return Result(inst, record.joined("kinds", np.int8)[counted], (stamps.reaped - stamps.issued)[counted],
                  (stamps.issued - stamps.set_up)[counted] if engine.queued else np.zeros(0, np.int64),
                  (stamps.reaped[counted] - start) / 1e9 - o["ramp_time"], record.joined("sizes")[counted],
                  np.array(syncs, np.int64), runtime,
                  {"usr": usage_after.ru_utime - usage_before.ru_utime,
                   "sys": usage_after.ru_stime - usage_before.ru_stime,
                   "ctx": (usage_after.ru_nvcsw - usage_before.ru_nvcsw)
                   + (usage_after.ru_nivcsw - usage_before.ru_nivcsw),
                   "majf": usage_after.ru_majflt - usage_before.ru_majflt,
                   "minf": usage_after.ru_minflt - usage_before.ru_minflt},
                  stamps.depth[counted], stamps.submit_calls, stamps.complete_calls,
                  record.joined("offsets")[counted])


def unlink_files(mine: list[Instance]) -> None:
    """unlink=1: remove the files (and our markers) of this rank's instances once every rank is done;
    a shared file by the copy that laid it out."""
    for inst in mine:
        for region in inst.owned if inst.job.options["unlink"] else []:
            region.path.unlink(missing_ok=True)
            Path(str(region.path) + MARKER_SUFFIX).unlink(missing_ok=True)


def prepare(mine: list[Instance], overwrite: bool) -> None:
    """Check write permission and lay out every file this rank's instances use."""
    for inst in mine:
        for region in inst.files:
            if writes(inst.job) and ENGINES[inst.job.options["ioengine"]].needs_file:
                check_writable(inst, region.path, overwrite)
            layout(inst, region, overwrite)


def run_watched(mine: list[Instance], levels: list[int], comm, exitall: bool = False
                ) -> tuple[list[Result], list[str], list[dict]]:
    """run_levels, with fio's disk_util of the block devices under this rank's files over the run."""
    devices = {device for inst in mine for region in inst.files if ENGINES[inst.job.options["ioengine"]].needs_file
               and (device := diskstats.device_of(region.path))}
    before, start = diskstats.snapshot(devices), time.monotonic()
    results, problems = run_levels(mine, levels, comm, exitall)
    return results, problems, diskstats.utilization(before, diskstats.snapshot(devices),
                                                   1000 * (time.monotonic() - start))


def run_levels(mine: list[Instance], levels: list[int], comm, exitall: bool = False) -> tuple[list[Result], list[str]]:
    """Run the job levels one after another (stonewall, wait_for), each started together on every
    rank once every rank is done with the one before; the problems of any rank end the run on all.
    With exitall (any job's; the same on every rank), a finished copy stops others (io/exits.py)."""
    results: list[Result] = []
    board = ExitBoard(comm) if exitall else None
    problems: list[str] = []
    try:
        for level in levels:
            comm.Barrier()
            try:
                results.extend(run_local([inst for inst in mine if inst.job.level == level], board))
                problem = None
            except (IOBenchError, OSError) as exc:
                problem = str(exc)
            if board:
                board.settle()
            problems = [p for p in comm.allgather(problem) if p]
            if problems:
                break
    finally:
        if board:
            board.close()
    return results, problems


def run_local(mine: list[Instance], board: ExitBoard | None = None) -> list[Result]:
    """Run this rank's prepared instances, started together.

    Instances of the file-descriptor engines (and null) run as concurrent threads, as fio runs
    jobs (as `thread` asks; fio forks a process per job otherwise). mpiio and hdf5
    instances run one after another on one thread, in the same order on every rank:
    MPI-IO and HDF5 calls from several threads of a rank can deadlock against the
    other ranks' collectives (HDF5 is not thread-safe; h5py serializes every call).
    """
    concurrent = [k for k, inst in enumerate(mine) if ENGINES[inst.job.options["ioengine"]].on_fd]
    serial = [k for k, inst in enumerate(mine) if not ENGINES[inst.job.options["ioengine"]].on_fd]
    lanes = [[k] for k in concurrent] + ([serial] if serial else [])
    start = threading.Barrier(len(lanes)) if lanes else None
    results: list = [None] * len(mine)
    errors: list = []

    def work(lane: list[int]) -> None:
        try:
            for position, k in enumerate(lane):
                results[k] = run_instance(mine[k], start if position == 0 else threading.Barrier(1), board)
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=work, args=(lane,), name=f"iobench-lane{n}") for n, lane in enumerate(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def direction_report(results: list[Result], kind: int, percentile_list, runtime_ms: int, group_bytes: int,
                     bins: bool = False) -> dict:
    """fio's per-direction block (jobs[].read / .write) from one or more results; `bins` adds
    json+'s clat histogram (bucket value in ns -> I/Os)."""
    def joined(field: str) -> np.ndarray:
        parts = [getattr(r, field)[r.kinds == kind] for r in results if len(getattr(r, field))]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    clat, slat, lat = joined("clat_ns"), joined("slat_ns"), joined("lat_ns")
    completed = np.concatenate([r.completed_s[r.kinds == kind] for r in results]) if results else np.zeros(0)
    sizes = np.concatenate([r.sizes[r.kinds == kind] for r in results]) if results else np.zeros(0, np.int64)
    io_bytes = int(sizes.sum())
    ios = len(clat)
    runtime_ms = runtime_ms if ios else 0
    bw_bytes = int(1000 * io_bytes / runtime_ms) if runtime_ms else 0
    bw_samples, iops_samples = windowed_rates(completed, sizes) if ios else (np.zeros(0), np.zeros(0))
    clat_summary = summary(clat)
    if ios:
        clat_summary["percentile"] = percentiles(clat, percentile_list)
        if bins:
            clat_summary["bins"] = histogram_bins(clat)
    return {
        "io_bytes": io_bytes, "io_kbytes": io_bytes // 1024, "bw_bytes": bw_bytes, "bw": bw_bytes // 1024,
        "iops": float(1000 * ios / runtime_ms) if runtime_ms else 0.0, "runtime": int(runtime_ms),
        "total_ios": ios, "short_ios": 0, "drop_ios": 0,
        "slat_ns": summary(slat), "clat_ns": clat_summary, "lat_ns": summary(lat),
        "bw_min": int(bw_samples.min()) if len(bw_samples) else 0,
        "bw_max": int(bw_samples.max()) if len(bw_samples) else 0,
        "bw_agg": float(100.0 * io_bytes / group_bytes) if group_bytes else 0.0,
        "bw_mean": float(bw_samples.mean()) if len(bw_samples) else 0.0,
        "bw_dev": float(bw_samples.std(ddof=1)) if len(bw_samples) > 1 else 0.0,
        "bw_samples": len(bw_samples),
        "iops_min": int(iops_samples.min()) if len(iops_samples) else 0,
        "iops_max": int(iops_samples.max()) if len(iops_samples) else 0,
        "iops_mean": float(iops_samples.mean()) if len(iops_samples) else 0.0,
        "iops_stddev": float(iops_samples.std(ddof=1)) if len(iops_samples) > 1 else 0.0,
        "iops_samples": len(iops_samples),
    }


def job_report(results: list[Result], groupid: int, group_bytes: dict, bins: bool = False) -> dict:
    """One entry of fio's "jobs" array for one instance, or for a whole group (group_reporting)."""
    job = results[0].instance.job
    runtime_ms = max(1, int(round(1000 * max(r.runtime_s for r in results))))  # fio's unit: whole ms
    lat_ns, lat_us, lat_ms = latency_distribution(np.concatenate([r.clat_ns for r in results]))  # fio: clat
    sync = np.concatenate([r.sync_ns for r in results])
    cpu_s = max(sum(r.runtime_s for r in results), 1e-9)
    percentile_list = job.options["percentile_list"]
    return {
        "jobname": job.name, "groupid": groupid, "error": 0, "eta": 0,
        "elapsed": int(round(max(r.runtime_s for r in results) + job.options["ramp_time"])),
        "job options": dict(job.raw),
        "read": direction_report(results, READ, percentile_list, runtime_ms, group_bytes[READ], bins),
        "write": direction_report(results, WRITE, percentile_list, runtime_ms, group_bytes[WRITE], bins),
        "trim": direction_report([], READ, percentile_list, 0, 0),
        # fio counts fsync calls in total_ios and fdatasync calls only in lat_ns (its N): so do we
        "sync": {"total_ios": len(sync) if job.options["fdatasync"] == 0 else 0, "lat_ns": summary(sync)},
        "job_runtime": runtime_ms,
        "usr_cpu": float(100 * sum(r.rusage["usr"] for r in results) / cpu_s),
        "sys_cpu": float(100 * sum(r.rusage["sys"] for r in results) / cpu_s),
        "ctx": int(sum(r.rusage["ctx"] for r in results)),
        "majf": int(sum(r.rusage["majf"] for r in results)),
        "minf": int(sum(r.rusage["minf"] for r in results)),
        "iodepth_level": depth_levels(np.concatenate([r.depth for r in results])),
        "iodepth_submit": call_sizes(np.concatenate([r.submit_calls for r in results])),
        "iodepth_complete": call_sizes(np.concatenate([r.complete_calls for r in results])),
        "latency_ns": lat_ns, "latency_us": lat_us, "latency_ms": lat_ms,
        "latency_depth": job.options["iodepth"], "latency_target": 0, "latency_percentile": 100.0, "latency_window": 0,
    }


def report(results: list[Result], jobfile, version: str, disk_util: list[dict], bins: bool = False) -> dict:
    """fio's JSON document (--output-format=json, or json+ with `bins`) for every result of the run."""
    group_bytes: dict[int, dict] = {}
    for r in results:
        totals = group_bytes.setdefault(r.instance.job.groupid, {READ: 0, WRITE: 0})
        for k in (READ, WRITE):
            totals[k] += int(r.sizes[r.kinds == k].sum())
    entries = []
    by_job: dict[int, list[Result]] = {}
    for r in sorted(results, key=lambda r: r.instance.number):
        by_job.setdefault(r.instance.job.index, []).append(r)
    for rs in by_job.values():
        job = rs[0].instance.job
        if job.options["group_reporting"]:
            entries.append(job_report(rs, job.groupid, group_bytes[job.groupid], bins))
        else:
            entries.extend(job_report([r], job.groupid, group_bytes[job.groupid], bins) for r in rs)
    now = time.time()
    return {"fio version": version, "timestamp": int(now), "timestamp_ms": int(now * 1000),
            "time": time.ctime(now), "global options": dict(jobfile.global_raw), "jobs": entries,
            "disk_util": disk_util}


def _human_bytes(n: float, binary: bool = True) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"] if binary else ["B", "kB", "MB", "GB", "TB"]
    step = 1024.0 if binary else 1000.0
    for unit in units:
        if n < step or unit == units[-1]:
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= step
    return f"{n:.1f}{units[-1]}"


def text_report(doc: dict) -> str:
    """fio's normal output, abridged: per job IOPS, bandwidth, latency and percentiles; group status."""
    lines = []
    for job in doc["jobs"]:
        lines.append(f"{job['jobname']}: (groupid={job['groupid']}, jobs=1): err= {job['error']}")
        for name in ("read", "write"):
            d = job[name]
            if not d["total_ios"]:
                continue
            lines.append(f"  {name}: IOPS={d['iops']:.0f}, BW={_human_bytes(d['bw_bytes'])}/s "
                         f"({_human_bytes(d['bw_bytes'], False)}/s)({_human_bytes(d['io_bytes'])}/{d['runtime']}msec)")
            for kind in ("slat", "clat", "lat") if d["slat_ns"]["N"] else ("clat",):  # as fio: slat where measured
                c = d[f"{kind}_ns"]
                lines.append(f"    {kind:>4} (usec): min={c['min'] / 1000:.0f}, max={c['max'] / 1000:.0f}, "
                             f"avg={c['mean'] / 1000:.2f}, stdev={c['stddev'] / 1000:.2f}")
            c = d["clat_ns"]
            pct = ", ".join(f"{float(k):.2f}th=[{v / 1000:.0f}]" for k, v in c.get("percentile", {}).items())
            lines.append(f"     clat percentiles (usec): {pct}")
        lines.append(f"  cpu          : usr={job['usr_cpu']:.2f}%, sys={job['sys_cpu']:.2f}%, ctx={job['ctx']}, "
                     f"majf={job['majf']}, minf={job['minf']}")
        lines.append("  IO depths    : " + ", ".join(f"{k}={v:.1f}%" for k, v in job["iodepth_level"].items()))
    for group in sorted({job["groupid"] for job in doc["jobs"]}):
        lines.append(f"\nRun status group {group} (all jobs):")
        for name in ("read", "write"):
            active = [j[name] for j in doc["jobs"] if j["groupid"] == group and j[name]["total_ios"]]
            if active:
                total = sum(d["io_bytes"] for d in active)
                longest = max(d["runtime"] for d in active)
                bw = 1000 * total / longest if longest else 0
                lines.append(f"  {name.upper():>5}: bw={_human_bytes(bw)}/s ({_human_bytes(bw, False)}/s), "
                             f"io={_human_bytes(total)}, run={min(d['runtime'] for d in active)}-{longest}msec")
    return "\n".join(lines)
