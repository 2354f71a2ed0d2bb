"""fio's job ordering, offset patterns, distributions, rates, engines, logs and command-line jobs,
each against fio 3.33 run on the same job file where fio can witness it."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import time

import pytest
from hpc_train.io import fiojob
from hpc_train.io.iostats import bucket_value

from .conftest import ROOT, python_cmd, run_mpi
from .test_iobench import fio_and_ours, iobench, schema_gaps

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (apt-get install fio)")


def log_rows(path) -> list[list[str]]:
    """A log file's rows split as fio2gnuplot splits them (commas to blanks, then on blanks)."""
    return [line.replace(",", " ").split() for line in path.read_text().splitlines()]


def offsets_of(path, bs: int = 4096) -> list[int]:
    """The block of every I/O in an iops log written with log_offset=1."""
    return [int(row[4]) // bs for row in log_rows(path)]


def our_run(tmp_path, text: str) -> dict:
    """Our JSON entry of the first job of this job file's text, run in tmp_path."""
    job = tmp_path / "job.fio"
    job.write_text(text)
    proc = iobench(job, "--output-format", "json", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["jobs"][0]


def logged_blocks(tmp_path, options: str, prefix: str) -> list[int]:
    """Run a 4 KiB job with these options, its I/Os logged with their offsets: the blocks, in order."""
    job = tmp_path / f"{prefix}.fio"
    job.write_text(f"[{prefix}]\nfilename={tmp_path / 'data'}\nbs=4k\nlog_offset=1\nwrite_iops_log={prefix}\n{options}")
    proc = iobench(job, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return offsets_of(tmp_path / f"{prefix}_iops.1.log")


@needs_fio
def test_stonewall_new_group_and_wait_for_give_fios_groups_and_counts(tmp_path):
    job = tmp_path / "order.fio"
    job.write_text(f"[global]\nbs=4k\nsize=128k\nfilename={tmp_path / 'data'}\n"
                   "[a]\nrw=read\n[b]\nstonewall\nrw=randread:4\n[c]\nnew_group\nrw=read:4k\n"
                   "[d]\nwait_for=a\nrw=read\n[e]\nrw=randread\n")
    fio_doc, our_doc = fio_and_ours(tmp_path, job)

    def groups(doc):
        return [(j["jobname"], j["groupid"], j["read"]["total_ios"], j["read"]["io_bytes"]) for j in doc["jobs"]]

    assert groups(our_doc) == groups(fio_doc)
    assert [g for _, g, _, _ in groups(our_doc)] == [0, 1, 2, 2, 2]
    text = iobench(job, "--overwrite", cwd=tmp_path).stdout
    assert "Run status group 1 (all jobs)" in text and "Run status group 2 (all jobs)" in text


def test_stonewall_waits_for_the_jobs_of_other_ranks(tmp_path):
    """Two rate-limited jobs of ~1.5 s each, on two ranks: with stonewall the second starts when the
    first (on the other rank) ends. Witness: the run's wall-clock time, against the same run without."""
    def elapsed(stonewall: str) -> float:
        job = tmp_path / f"wall{len(stonewall)}.fio"
        job.write_text(f"[global]\ndirectory={tmp_path}\nbs=4k\nsize=384k\nrate=256k\nrw=read\n"
                       f"[first]\n[second]\n{stonewall}")
        start = time.monotonic()
        proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "iobench", str(job), "--output-format", "json"),
                       timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert [j["groupid"] for j in json.loads(proc.stdout)["jobs"]] == ([0, 1] if stonewall else [0, 0])
        return time.monotonic() - start

    together, in_turn = elapsed(""), elapsed("stonewall\n")
    assert in_turn - together > 1.0, (together, in_turn)


@pytest.mark.parametrize("limit, expected", [("rate=1m", 1 << 20), ("rate_iops=1000", 1000 * 4096),
                                             ("rate_iops=1000\nrate_process=poisson", 1000 * 4096),
                                             ("rw=write\nrate=,512k", 512 << 10)])
def test_rates_hold_within_ten_percent_over_the_job(tmp_path, limit, expected):
    """About a second of I/O at the limit: the job's bandwidth (its bytes over its runtime, as fio's
    bw_bytes) within 10% of it; poisson gaps have the same mean."""
    job = tmp_path / "rate.fio"
    job.write_text(f"[r]\nfilename={tmp_path / 'data'}\nbs=4k\nsize=8m\nrw=read\nnumber_ios={expected // 4096}\n"
                   f"{limit}\n")
    start = time.monotonic()
    proc = iobench(job, "--output-format", "json", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["jobs"][0]
    direction = entry["write"] if "write" in limit else entry["read"]
    assert direction["total_ios"] == expected // 4096
    assert abs(direction["bw_bytes"] - expected) < 0.1 * expected, direction["bw_bytes"]
    assert time.monotonic() - start > 0.9  # the run really took the time: not a rate computed after the fact


@needs_fio
def test_sequential_holes_give_fios_offsets(tmp_path):
    """rw=read:4k: every other block, wrapping to the start when the region ends (fio's own log of
    the same job lists the same offsets in the same order)."""
    job = tmp_path / "holes.fio"
    job.write_text(f"[h]\nfilename={tmp_path / 'data'}\nbs=4k\nsize=256k\nrw=read:4k\nlog_offset=1\n"
                   f"write_iops_log={tmp_path / 'fio'}\n")
    subprocess.run(["fio", "--output=/dev/null", str(job)], check=True, timeout=120, cwd=tmp_path)
    job.write_text(job.read_text().replace(f"write_iops_log={tmp_path / 'fio'}", f"write_iops_log={tmp_path / 'our'}"))
    proc = iobench(job, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ours = offsets_of(tmp_path / "our_iops.1.log")
    assert ours == offsets_of(tmp_path / "fio_iops.1.log")
    assert ours[:3] == [0, 2, 4] and len(ours) == 64


def test_random_runs_take_n_minus_1_sequential_blocks(tmp_path):
    blocks = logged_blocks(tmp_path, "size=256k\nrw=randread:4\n", "runs")
    assert len(blocks) == 64
    assert all(blocks[k] == (blocks[k - 1] + 1) % 64 for k in range(len(blocks)) if k % 4)
    heads = [blocks[k] for k in range(0, 64, 4)]
    assert len(set(heads)) == len(heads)  # the random heads come from the random map: never twice


@needs_fio
@pytest.mark.parametrize("distribution", ["random", "zipf:1.2", "pareto:0.3", "normal:10", "normal:50"])
def test_random_distributions_skew_as_fios(tmp_path, distribution):
    """16 passes' worth of 4 KiB reads over 256 blocks without a random map: the share of the
    10 and 50 hottest blocks and the number of distinct blocks, from fio's log and ours, agree."""
    def run(program: list[str], prefix: str) -> list[int]:
        job = tmp_path / f"{prefix}.fio"
        job.write_text(f"[d]\nfilename={tmp_path / 'data'}\nbs=4k\nsize=1m\nio_size=16m\nrw=randread\n"
                       f"norandommap\nrandom_distribution={distribution}\nlog_offset=1\nwrite_iops_log={prefix}\n")
        subprocess.run([*program, str(job)], check=True, timeout=120, cwd=tmp_path, capture_output=True)
        return offsets_of(tmp_path / f"{prefix}_iops.1.log")

    def shape(blocks):
        counts = sorted(collections.Counter(blocks).values(), reverse=True)
        return sum(counts[:10]) / len(blocks), sum(counts[:50]) / len(blocks), len(counts)

    theirs = shape(run(["fio", "--output=/dev/null"], "fio"))
    ours = shape(run([sys.executable, "-m", "hpc_train.cli", "iobench", "--overwrite", "--output=/dev/null"], "our"))
    for mine, fios in zip(ours, theirs, strict=True):
        assert abs(mine - fios) <= 0.15 * fios, (ours, theirs)


def test_random_map_reads_every_block_once_a_pass(tmp_path):
    blocks = logged_blocks(tmp_path, "size=256k\nio_size=512k\nrw=randread\n", "map")
    assert sorted(blocks[:64]) == sorted(blocks[64:]) == list(range(64)) and blocks[:64] != blocks[64:]


def test_randrepeat_and_randseed_decide_the_offsets(tmp_path):
    def blocks(extra: str, prefix: str) -> list[int]:
        return logged_blocks(tmp_path, f"size=256k\nrw=randread\n{extra}", prefix)

    assert blocks("", "a") == blocks("", "b")  # randrepeat=1 (default): the same on every run
    assert blocks("randseed=7", "c") == blocks("randseed=7", "d") != blocks("", "e")
    assert blocks("randrepeat=0", "f") != blocks("randrepeat=0", "g")


@needs_fio
@pytest.mark.parametrize("engine", ["sync", "pvsync", "null"])
def test_engines_give_fios_counts(tmp_path, engine):
    job = tmp_path / "e.fio"
    job.write_text(f"[e]\nioengine={engine}\nfilename={tmp_path / 'data'}\nbs=4k\nsize=512k\nrw=randrw\n"
                   "end_fsync=1\nfallocate=keep\n")
    fio_doc, our_doc = fio_and_ours(tmp_path, job)
    mine, fios = our_doc["jobs"][0], fio_doc["jobs"][0]

    def ios(entry):
        return entry["read"]["total_ios"] + entry["write"]["total_ios"]

    assert ios(mine) == ios(fios) == 128
    assert mine["read"]["total_ios"] > 0 and mine["write"]["total_ios"] > 0


def test_null_engine_touches_no_file(tmp_path):
    job = tmp_path / "n.fio"
    job.write_text(f"[n]\nioengine=null\ndirectory={tmp_path / 'nowhere'}\nbs=4k\nsize=1m\nrw=write\n")
    proc = iobench(job, "--output-format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["jobs"][0]["write"]["total_ios"] == 256
    assert not (tmp_path / "nowhere").exists()


@needs_fio
def test_log_files_are_named_and_shaped_as_fios(tmp_path):
    """Per-I/O and averaged logs of two job copies: fio's file names and columns, fio2gnuplot's
    parse of every row (time, value, direction, bs), a row per I/O, averaged bandwidth near the job's."""
    text = ("[global]\nbs=4k\nsize=256k\nrw=randrw\nnumjobs=2\n[per_io]\nwrite_bw_log\nwrite_lat_log\n"
            "write_iops_log\n[avg]\nstonewall\nrate=1m\ntime_based\nruntime=1\nlog_avg_msec=100\n"
            "write_bw_log=avg\nwrite_iops_log=avg\n")
    runs = {}
    for who, program in (("fio", ["fio", "--output-format=json"]),
                         ("ours", [sys.executable, "-m", "hpc_train.cli", "iobench", "--output-format=json"])):
        folder = tmp_path / who
        folder.mkdir()
        (folder / "j.fio").write_text(text)
        proc = subprocess.run([*program, "j.fio"], capture_output=True, text=True, timeout=120, cwd=folder)
        assert proc.returncode == 0, proc.stderr
        runs[who] = (json.loads(proc.stdout), sorted(p.name for p in folder.glob("*.log")))
    (_, fio_logs), (our_doc, our_logs) = runs["fio"], runs["ours"]
    assert our_logs == fio_logs
    for name in our_logs:
        rows = log_rows(tmp_path / "ours" / name)
        fio_rows = log_rows(tmp_path / "fio" / name)
        for time_ms, value, direction, bs in (row[:4] for row in rows):
            float(time_ms), int(value), int(bs)
            assert direction in ("0", "1")
        if fio_rows:
            assert {len(r) for r in rows} == {len(fio_rows[0])}
        copy = int(name.split(".")[-2]) - 1
        job = our_doc["jobs"][copy]
        if name.startswith("per_io") and "slat" not in name:
            assert len(rows) == job["read"]["total_ios"] + job["write"]["total_ios"]
        if name.startswith("avg_bw"):
            reads = [int(r[1]) for r in rows if r[2] == "0"]
            assert abs(sum(reads) / len(reads) - job["read"]["bw"]) < 0.25 * job["read"]["bw"]
    assert log_rows(tmp_path / "ours" / "per_io_slat.1.log") == []  # psync has no submission step


@needs_fio
def test_command_line_jobs_run_as_fios(tmp_path):
    words = ["--bs=4k", "--size=256k", f"--filename={tmp_path / 'data'}", "--name=one", "--rw=randread",
             "--name=two", "--rw=read:4k", "--stonewall"]
    fio_doc = json.loads(subprocess.run(["fio", "--output-format=json", *words], capture_output=True, text=True,
                                        check=True, timeout=120, cwd=tmp_path).stdout)
    proc = iobench(*words, "--output-format=json", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    def summary(doc):
        return [(j["jobname"], j["groupid"], j["read"]["total_ios"], j["job options"]) for j in doc["jobs"]]

    assert summary(json.loads(proc.stdout)) == summary(fio_doc)
    bad = iobench("--name=x", "--size=1m", "--colour=red", cwd=tmp_path)
    assert bad.returncode == 2 and "<command line>:3: option 'colour' is not supported" in bad.stderr


@needs_fio
@pytest.mark.parametrize("engine", ["psync", "libaio", "io_uring", "posixaio"])
def test_verify_reads_back_every_written_block_as_fio_counts(tmp_path, engine):
    """A randwrite job with verify: every block written, then read back and checked; fio reports
    its read-back as reads, and so do we (the same counts on the same job)."""
    job = tmp_path / "v.fio"
    depth = "iodepth=8\n" if engine != "psync" else ""  # fio notes on stdout that psync caps it at 1
    job.write_text(f"[v]\nioengine={engine}\n{depth}direct=1\nfilename={tmp_path / 'data'}\nbs=4k\n"
                   "size=256k\nrw=randwrite\nverify=crc32c\n")
    fio_doc, our_doc = fio_and_ours(tmp_path, job)

    def counts(doc):
        return doc["jobs"][0]["write"]["total_ios"], doc["jobs"][0]["read"]["total_ios"]

    assert counts(our_doc) == counts(fio_doc) == (64, 64)


@pytest.mark.parametrize("kind", ["crc32c", "md5"])
def test_verify_finds_a_corrupted_or_misplaced_block(tmp_path, kind):
    """Blocks written with verify, then damaged behind the benchmark's back: a read job with verify
    fails naming the block (a flipped byte: its checksums; two blocks swapped: where each belongs),
    and leaves the file as it found it."""
    data = tmp_path / "data"
    write = tmp_path / "w.fio"
    write.write_text(f"[w]\nfilename={data}\nbs=4k\nsize=256k\nrw=randwrite\nverify={kind}\n")
    assert iobench(write, "--overwrite", cwd=tmp_path).returncode == 0
    read = tmp_path / "r.fio"
    read.write_text(f"[r]\nioengine=libaio\niodepth=4\nfilename={data}\nbs=4k\nsize=256k\nrw=read\nverify={kind}\n")
    assert iobench(read, cwd=tmp_path).returncode == 0  # intact: every block checks

    original = data.read_bytes()
    flipped = bytearray(original)
    flipped[9 * 4096 + 1000] ^= 0xFF
    data.write_bytes(flipped)
    proc = iobench(read, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"{data}: verify ({kind}) failed at offset {9 * 4096}, length 4096: expected checksum" in proc.stderr
    assert data.read_bytes() == flipped

    swapped = bytearray(original)
    swapped[0:4096], swapped[4096:8192] = original[4096:8192], original[0:4096]
    data.write_bytes(swapped)
    proc = iobench(read, cwd=tmp_path)
    assert proc.returncode == 1 and "the block there says it belongs at offset 4096" in proc.stderr


@needs_fio
def test_json_plus_bins_and_disk_util_as_fios(tmp_path):
    """json+: fio's schema with clat bins that count every I/O at fio's bucket values; disk_util
    names the device under the file, as fio's does, with counters that grew by real reads."""
    job = tmp_path / "plus.fio"
    job.write_text(f"[p]\nfilename={tmp_path / 'data'}\nbs=4k\nsize=1m\nrw=randread\ndirect=1\n")
    fio_doc = json.loads(subprocess.run(["fio", "--output-format=json+", str(job)], capture_output=True, text=True,
                                        check=True, timeout=120, cwd=tmp_path).stdout)
    proc = iobench(job, "--output-format=json+", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    our_doc = json.loads(proc.stdout)
    assert schema_gaps(fio_doc, our_doc) == []
    clat = our_doc["jobs"][0]["read"]["clat_ns"]
    assert sum(clat["bins"].values()) == clat["N"] == 256
    assert set(map(int, clat["bins"])) <= {int(bucket_value(i)) for i in range(64 * 30)}
    assert clat["min"] <= min(map(int, clat["bins"])) * 1.02 and max(map(int, clat["bins"])) <= clat["max"] * 1.02
    assert [d["name"] for d in our_doc["disk_util"]] == [d["name"] for d in fio_doc["disk_util"]]
    if our_doc["disk_util"]:  # direct reads reach the disk: its read counter moved
        assert our_doc["disk_util"][0]["read_ios"] >= 1


@needs_fio
@pytest.mark.parametrize("mix", ["bssplit=4k/10:64k/50:32k/40", "bsrange=4k-16k", "bssplit=4k/50:16k/50,8k"])
def test_block_size_mixes_give_fios_bytes_and_shares(tmp_path, mix):
    """Several block sizes: a sequential read moves fio's bytes with each size's share of the I/Os
    near fio's (from both logs' bs column); a random read through the random map reads every 4 KiB
    block of the region exactly once, at aligned offsets, as fio's map does; a mixed job moves the
    region's bytes, as fio's does."""
    def run(program: list[str], prefix: str, rw: str) -> tuple[dict, list[list[str]]]:
        job = tmp_path / f"{prefix}-{rw}.fio"
        job.write_text(f"[m]\nfilename={tmp_path / 'data'}\nsize=16m\nrw={rw}\n{mix}\nlog_offset=1\n"
                       f"write_iops_log={prefix}-{rw}\n")
        proc = subprocess.run([*program, "--output-format=json", str(job)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["jobs"][0], log_rows(tmp_path / f"{prefix}-{rw}_iops.1.log")

    fio_cmd, our_cmd = ["fio"], [sys.executable, "-m", "hpc_train.cli", "iobench", "--overwrite"]

    def shares(rows):
        counts = collections.Counter(int(row[3]) for row in rows)
        return {size: count / len(rows) for size, count in counts.items()}

    (fio_job, fio_rows), (our_job, our_rows) = run(fio_cmd, "fio", "read"), run(our_cmd, "our", "read")
    assert our_job["read"]["io_bytes"] == fio_job["read"]["io_bytes"] == 16 << 20
    theirs, mine = shares(fio_rows), shares(our_rows)
    assert set(mine) == set(theirs) and all(abs(mine[s] - theirs[s]) < 0.08 for s in mine), (mine, theirs)

    our_job, rows = run(our_cmd, "our", "randread")
    assert our_job["read"]["io_bytes"] == 16 << 20
    covered = sorted((int(row[4]), int(row[4]) + int(row[3])) for row in rows)
    assert all(start % 4096 == 0 for start, _ in covered)
    assert all(end == next_start for (_, end), (next_start, _) in zip(covered, covered[1:], strict=False))
    assert covered[0][0] == 0 and covered[-1][1] == 16 << 20  # every block once: no gap, no overlap

    def moved(prefix_and_cmd):
        job, _ = run(prefix_and_cmd[1], prefix_and_cmd[0], "randrw")
        return job["read"]["io_bytes"] + job["write"]["io_bytes"]

    assert moved(("our", our_cmd)) == 16 << 20
    if "," not in mix:  # fio 3.33 stops short (12 of 16 MiB) when reads and writes have different sizes
        assert moved(("fio", fio_cmd)) == 16 << 20


def test_verify_with_several_block_sizes(tmp_path):
    """Blocks of several sizes written at depth with verify: each carries its own length, the
    read-back checks every one."""
    entry = our_run(tmp_path, f"[vb]\nioengine=io_uring\niodepth=8\ndirect=1\nfilename={tmp_path / 'data'}\n"
                               "size=1m\nrw=randwrite\nbssplit=4k/50:16k/30:64k/20\nverify=md5\n")
    assert entry["write"]["io_bytes"] == entry["read"]["io_bytes"] == 1 << 20
    assert entry["write"]["total_ios"] == entry["read"]["total_ios"]


def test_verify_reads_back_only_whole_blocks_when_writes_overlap(tmp_path):
    """Two passes of random writes of several sizes without the random map overlap each other in
    part: the read-back checks the last write of each place and passes over blocks a later write
    cut into (a false alarm otherwise), and still checks most of what was written."""
    entry = our_run(tmp_path, f"[ov]\nfilename={tmp_path / 'data'}\nsize=256k\nio_size=1m\nrw=randwrite\n"
                               "norandommap\nbssplit=4k/50:16k/50\nverify=crc32c\n")
    assert entry["write"]["io_bytes"] == 1 << 20
    assert 0 < entry["read"]["io_bytes"] <= 256 << 10  # never more than the region: one check per place


OUR_OPTIONS = ("ioengine=mpiio", "ioengine=hdf5", "collective", "hdf5_chunk")  # fio has no such engines


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "io").glob("*.fio")), ids=lambda p: p.name)
def test_the_shipped_job_files_parse_here_and_in_fio(path):
    """Every example job file is accepted by our parser, and by fio's where it uses only fio's options."""
    jobfile = fiojob.load(path)
    assert jobfile.jobs and not jobfile.ignored
    if shutil.which("fio") and not any(option in path.read_text() for option in OUR_OPTIONS):
        proc = subprocess.run(["fio", "--parse-only", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


@needs_fio
@pytest.mark.parametrize("what", ["group", "all", "stonewall"])
def test_exitall_stops_the_jobs_fio_stops_across_ranks(tmp_path, what):
    """exitall: `short` ends at once; with exit_what=group it stops `long` (its group) only, with
    all every job including the later stonewalled one, with stonewall the jobs running then. Under
    mpirun -n 2 the jobs sit on both ranks (short and other on rank 0, long and later on rank 1).
    Witness: which jobs fio cuts short on the same file, and each job's bytes."""
    job = tmp_path / "exit.fio"
    job.write_text(f"[global]\ndirectory={tmp_path}\nbs=4k\nrw=read\nexitall\nexit_what={what}\n"
                   "[short]\nsize=64k\n[long]\nsize=16m\nrate=1m\n[other]\nnew_group\nsize=2m\nrate=1m\n"
                   "[later]\nstonewall\nsize=64k\n")
    sizes = {"short": 64 << 10, "long": 16 << 20, "other": 2 << 20, "later": 64 << 10}

    def whole(doc):
        return {j["jobname"]: j["read"]["io_bytes"] == sizes[j["jobname"]] for j in doc["jobs"]}

    fio_doc = json.loads(subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True, text=True,
                                        check=True, timeout=120, cwd=tmp_path).stdout)
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "iobench", str(job), "--output-format", "json"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = {"short": True, "long": False, "other": what == "group", "later": what != "all"}
    assert whole(json.loads(proc.stdout)) == whole(fio_doc) == expected


def test_a_random_pass_over_a_huge_region_is_made_in_pieces(tmp_path):
    """randread over a 1 TiB region (null engine: no file), stopped after 10000 I/Os: the random map
    is evaluated a piece at a time, so the process's peak resident memory (its own getrusage, the
    witness) stays near a small job's. When a pass was made whole (a permutation of all 268 M
    blocks, then offsets, directions and sizes for each) this needed some 8 GB."""
    def peak_mb(size: str) -> float:
        job = tmp_path / f"{size}.fio"
        job.write_text(f"[big]\nioengine=null\nbs=4k\nsize={size}\nrw=randread\nnumber_ios=10000\n")
        code = ("import resource, sys\nfrom hpc_train.cli import main\n"
                f"rc = main(['iobench', {str(job)!r}, '--output-format', 'json'])\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["jobs"][0]["read"]["total_ios"] == 10000
        return int(proc.stderr.strip().splitlines()[-1]) / 1024

    small, huge = peak_mb("64m"), peak_mb("1t")
    assert huge - small < 256, (small, huge)  # a piece of the pass and its arrays; the whole pass: 10 GB
