"""The fio-compatible I/O benchmark: job files, statistics, runs and fio's JSON schema (serial)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hpc_train.io import fiojob
from hpc_train.io.iostats import bucket_index, bucket_value, percentiles
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_train.errors import JobFileError

from .conftest import clean_environment, python_cmd, run_mpi


def iobench(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "hpc_train.cli", "iobench", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_job_file_globals_units_and_flags():
    jobs = fiojob.parse("""
; comment
[global]
bs=64k
size=1m
direct
[a]
rw=randread
runtime=500ms
time_based
[global]
numjobs=2
[b]
readwrite=randrw
rwmixread=70
percentile_list=50:99.5
size=2MiB
""", "x.fio")
    a, b = jobs.jobs
    assert a.options["bs"] == 65536 and a.options["direct"] is True and a.options["runtime"] == 0.5
    assert a.options["time_based"] is True and a.options["numjobs"] == 1  # later globals do not reach back
    assert b.options["numjobs"] == 2 and b.options["rw"] == "randrw" and b.options["size"] == 2 << 20
    assert b.options["percentile_list"] == (50.0, 99.5) and b.raw == {
        "readwrite": "randrw", "rwmixread": "70", "percentile_list": "50:99.5", "size": "2MiB"}
    assert jobs.global_raw == {"bs": "64k", "size": "1m", "numjobs": "2"}  # fio echoes no bare flag


@pytest.mark.parametrize("text, message", [
    ("[a]\nsize=1m\nuid=0\n", "x.fio:3: option 'uid' is not supported by hpc-train iobench; supported: "),
    ("[a]\nsize=1m\nblocksise=4k\n", "x.fio:3: option 'blocksise' is not supported by hpc-train iobench (did you "
                                      "mean 'blocksize'?)"),
    ("[a]\nsize=1m\ndirectory=${HPC_TRAIN_UNSET_FOR_TEST}\n",
     "x.fio:3: environment variable 'HPC_TRAIN_UNSET_FOR_TEST' is not set"),
    ("[a]\nsize=1m\ninclude\n", "x.fio:3: include needs a file name"),
    ("[a]\nsize=1m\nbs=4q\n", "x.fio:3: bad value for option 'bs'"),
    ("[a]\nsize=1m\nrw=trim\n", "x.fio:3: bad value for option 'rw'"),
    ("[a]\nsize=1m\nioengine=spdk\n", "ioengine 'spdk' is not supported here"),
    ("[a]\nsize=1m\nrwmixread=101\n", "x.fio:3: bad value for option 'rwmixread'"),
    ("[a]\nsize=1m\nnumjobs=100000000\n", "x.fio:3: bad value for option 'numjobs': 100000000 is outside [1, 4096]"),
    ("[a]\nrw=read\n", "x.fio:1: job 'a' has no size"),
    ("[a]\nsize=1m\nbs=0\n", "size (1048576) must be at least the largest block size (0), and block sizes positive"),
    ("[a]\nsize=1k\nbs=4k\n", "size (1024) must be at least the largest block size (4096)"),
    ("[a]\nsize=1m\ndirect=1\nbs=1000\n", "direct=1 needs every block size a multiple of 512, got 1000"),
    ("[a]\nsize=1m\ntime_based\n", "time_based needs runtime="),
    ("bs=4k\n[a]\n", "x.fio:1: option outside any section"),
    ("[a\nsize=1m\n", "x.fio:1: malformed section header"),
    ("[global]\nbs=4k\n", "no job sections"),
    ("[a]\nsize=1m\nioengine=mpiio\ndirect=1\n",
     "direct=1 works with ioengine=psync, pvsync, sync, null, libaio, io_uring, posixaio only"),
    ("[a]\nsize=1m\ncollective=1\n", "collective=1 needs ioengine=mpiio or hdf5"),
    ("[a]\nsize=1m\nioengine=hdf5\ncollective=1\n", "collective=1 needs filename="),
    ("[a]\nsize=1m\nioengine=mpiio\ncollective=1\nfilename=f\nrw=randrw\n", "one direction (not rw/randrw)"),
])
def test_job_file_errors_name_file_line_and_option(text, message):
    with pytest.raises(JobFileError, match=re.escape(message)):
        fiojob.parse(text, "x.fio")


def test_histogram_is_fios():
    values = np.array([0, 1, 127, 128, 129, 255, 256, 1000, 12345, 1 << 20])
    # fio's plat_val_to_idx / plat_idx_to_val (stat.h, FIO_IO_U_PLAT_BITS 6), worked by hand
    np.testing.assert_array_equal(bucket_index(values), [0, 1, 127, 128, 128, 191, 192, 317, 544, 960])
    np.testing.assert_array_equal(bucket_value(bucket_index(values)),
                                  [0, 1, 127, 129, 129, 255, 258, 1004, 12352, 1056768])
    big = np.random.default_rng(0).integers(1, 10**9, 10**5)
    assert np.max(np.abs(bucket_value(bucket_index(big)) - big) / big) < 1 / 64
    p = percentiles(np.arange(1, 101), [50, 99, 100])
    assert p == {"50.000000": 50, "99.000000": 99, "100.000000": 100}


def test_runs_write_then_read_and_reports(tmp_path):
    job = tmp_path / "j.fio"
    job.write_text(f"""
[global]
directory={tmp_path}
bs=4k
size=256k
percentile_list=50:99
[writer]
rw=randwrite
fsync=8
numjobs=2
[mixed]
rw=randrw
rwmixread=50
loops=2
""")
    proc = iobench(job, "--output-format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    names = [j["jobname"] for j in doc["jobs"]]
    assert names == ["writer", "writer", "mixed"]  # numjobs copies reported one by one
    w = doc["jobs"][0]
    assert w["write"]["io_bytes"] == 256 << 10 and w["write"]["total_ios"] == 64 and w["read"]["total_ios"] == 0
    # fsync=8 after 64 writes: 7, as fio counts (the sync comes before the I/O after every 8th write)
    assert w["sync"]["total_ios"] == 7 and set(w["write"]["clat_ns"]["percentile"]) == {"50.000000", "99.000000"}
    m = doc["jobs"][2]
    assert m["read"]["total_ios"] + m["write"]["total_ios"] == 2 * 64 and m["read"]["total_ios"] > 10
    assert (tmp_path / "writer.0.0").stat().st_size == 256 << 10
    assert (tmp_path / "writer.1.0.hpc_train-iobench").exists()
    text = iobench(job).stdout
    assert "writer: (groupid=0" in text and "Run status group 0" in text and "WRITE: bw=" in text


def test_never_overwrites_a_foreign_file(tmp_path):
    precious = tmp_path / "precious.dat"
    precious.write_bytes(b"keep me" * 1000)
    job = tmp_path / "w.fio"
    job.write_text(f"[w]\nrw=write\nsize=64k\nfilename={precious}\n")
    proc = iobench(job)
    assert proc.returncode != 0
    assert f"would write {precious}, which hpc-train iobench did not create; pass --overwrite" in proc.stderr
    assert precious.read_bytes() == b"keep me" * 1000
    assert iobench(job, "--overwrite").returncode == 0


def test_bad_job_file_fails_before_running(tmp_path):
    job = tmp_path / "bad.fio"
    job.write_text("[a]\nsize=1m\nzonemode=zbd\n")
    proc = iobench(job)
    assert proc.returncode == 2 and f"{job}:3: option 'zonemode' is not supported by hpc-train iobench" in proc.stderr


def test_numjobs_spread_over_ranks_with_group_reporting(tmp_path):
    job = tmp_path / "g.fio"
    job.write_text(f"[global]\ndirectory={tmp_path}\n[g]\nrw=read\nbs=16k\nsize=512k\nnumjobs=4\ngroup_reporting\n")
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "iobench", str(job), "--output-format", "json"),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["jobs"]) == 1 and doc["jobs"][0]["read"]["io_bytes"] == 4 * (512 << 10)


def schema_gaps(theirs, ours, path=""):
    """Every key fio emits must exist in ours with the same JSON type."""
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            return [f"{path}: dict expected, got {type(ours).__name__}"]
        return [gap for key, value in theirs.items()
                for gap in ([f"{path}.{key}: missing"] if key not in ours else schema_gaps(value, ours[key],
                                                                                          f"{path}.{key}"))]
    if isinstance(theirs, list):
        return [] if isinstance(ours, list) else [f"{path}: list expected"]
    return [] if type(theirs) is type(ours) else [f"{path}: {type(theirs).__name__} expected, "
                                                  f"got {type(ours).__name__}"]


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (apt-get install fio)")
@pytest.mark.parametrize("rw", ["read", "randwrite"])
def test_json_has_every_field_fio_emits(tmp_path, rw):
    job = tmp_path / "same.fio"
    job.write_text(f"[global]\nioengine=psync\nbs=4k\nsize=1m\ndirect=1\npercentile_list=50:99:99.9\n"
                   f"[same]\nrw={rw}\nfilename={tmp_path / 'data'}\n")
    theirs = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr
    fio_doc = json.loads(theirs.stdout)
    ours = iobench(job, "--output-format", "json", "--overwrite", cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    our_doc = json.loads(ours.stdout)
    assert [sorted(d) for d in our_doc["disk_util"]] == [sorted(d) for d in fio_doc["disk_util"]]  # same devices
    assert schema_gaps(fio_doc, our_doc) == []
    direction = "read" if rw == "read" else "write"
    assert our_doc["jobs"][0][direction]["io_bytes"] == fio_doc["jobs"][0][direction]["io_bytes"]
    assert list(our_doc["jobs"][0][direction]["clat_ns"]["percentile"]) == \
        list(fio_doc["jobs"][0][direction]["clat_ns"]["percentile"])


SEED_JOB = """[global]
ioengine=psync
bs=4k
size=1m
direct=1
[job1]
rw=randread
runtime=2
time_based
percentile_list=50:99
"""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_fuzz_random_text_only_ever_raises_job_file_error(text):
    with contextlib.suppress(JobFileError):
        fiojob.parse(text, "fuzz.fio")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(SEED_JOB)), st.integers(0, 5),
                          st.text(alphabet="[]=;#\n :.-_kmgKMG0123456789abcdefrwxyz", max_size=6)), max_size=6))
def test_fuzz_mutated_job_files_only_ever_raise_job_file_error(edits):
    text = SEED_JOB
    for position, delete, insert in edits:
        text = text[:position] + insert + text[position + delete :]
    try:
        jobs = fiojob.parse(text, "fuzz.fio")
    except JobFileError:
        return
    for job in jobs.jobs:  # whatever parses is a complete, consistent job
        assert job.options["size"] > 0 and job.options["bs"] > 0 and job.options["rw"] in fiojob.RW_MODES.values()


ENGINES_JOB = """
[global]
directory={d}
bs=64k
size=512k
[mpiio-independent]
ioengine=mpiio
rw=randread
numjobs=2
[mpiio-collective]
ioengine=mpiio
rw=write
filename=shared.dat
offset_increment=512k
numjobs=2
collective=1
[hdf5-collective]
ioengine=hdf5
rw=read
filename=shared.h5
offset_increment=512k
numjobs=2
collective=1
[hdf5-chunked]
ioengine=hdf5
rw=randwrite
hdf5_chunk=128k
numjobs=2
"""


def test_mpiio_and_hdf5_engines_independent_and_collective(tmp_path):
    job = tmp_path / "engines.fio"
    job.write_text(ENGINES_JOB.format(d=tmp_path))
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "iobench", str(job), "--output-format", "json"),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by_name = {}
    for entry in doc["jobs"]:
        by_name.setdefault(entry["jobname"], []).append(entry)
    for name, direction in (("mpiio-independent", "read"), ("mpiio-collective", "write"),
                            ("hdf5-collective", "read"), ("hdf5-chunked", "write")):
        entries = by_name[name]
        assert len(entries) == 2 and all(e[direction]["io_bytes"] == 512 << 10 for e in entries), name
    assert (tmp_path / "shared.dat").stat().st_size == 1 << 20  # two copies, offset_increment apart
    with h5py.File(tmp_path / "hdf5-chunked.0.0", "r") as f:
        assert f["data"].chunks == (128 << 10,) and f["data"].shape == (512 << 10,)
    bad = tmp_path / "bad.fio"
    bad.write_text(f"[c]\nioengine=mpiio\nrw=read\nsize=64k\nfilename={tmp_path / 'x'}\ncollective=1\nnumjobs=3\n")
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "iobench", str(bad)), timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("collective=1 needs numjobs equal to the number of ranks (2), got 3") == 2


def test_a_layout_that_would_not_fit_is_refused_before_any_file_is_written(tmp_path):
    """Two ranks lay out on one 64 MiB file system (a tmpfs in a mount namespace of the run's own):
    each rank's share fits alone, together they would not; the witness is the tmpfs's own size."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs of a set size needs root and unshare")
    disk = tmp_path / "disk"
    disk.mkdir()

    def run(numjobs: int, size: str) -> subprocess.CompletedProcess:
        job = tmp_path / f"read-{numjobs}x{size}.fio"
        job.write_text(f"[global]\ndirectory={disk}\nbs=1m\nsize={size}\nrw=read\n[r]\nnumjobs={numjobs}\n")
        script = (f'mount -t tmpfs -o size=64m tmpfs {disk} && '
                  f'{{ "$@"; rc=$?; echo "files:" $(ls -A {disk}); exit $rc; }}')
        return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", "mpirun", "-n", "2",
                               *python_cmd("-m", "hpc_train.cli", "iobench", str(job))],
                              capture_output=True, text=True, timeout=120, env=clean_environment())

    refused = run(2, "40m")
    assert refused.returncode != 0
    assert refused.stderr.count(f"job(s) r would lay out 80.0MiB on {disk} (tmpfs tmpfs, on ") == 1, refused.stderr
    assert "(rank(s) 0, 1), which has 64.0MiB free" in refused.stderr
    assert refused.stdout.strip().endswith("files:")  # nothing laid out, not even one rank's share
    fits = run(2, "24m")
    assert fits.returncode == 0, fits.stderr
    assert "files: r.0.0 r.0.0.hpc_train-iobench r.1.0 r.1.0.hpc_train-iobench" in fits.stdout


FIO_SPELLINGS = """[global]
size=64k
include {include}
[first]
name=alpha
description=fio's other spellings
blocksize=4k
readwrite=randrw
rwmixwrite=30
directory=${{HPC_TRAIN_TEST_DIR}}
thread
[second]
rw=read
"""


def test_fios_spellings_includes_variables_and_sections(tmp_path, monkeypatch):
    """A job file in fio's own syntax; the witness that it is fio's is fio itself (--parse-only)."""
    (tmp_path / "common.fio").write_text("bs=8k\ngtod_reduce=1\n")
    job = tmp_path / "spellings.fio"
    job.write_text(FIO_SPELLINGS.format(include="common.fio"))
    monkeypatch.setenv("HPC_TRAIN_TEST_DIR", str(tmp_path))
    if shutil.which("fio"):
        assert subprocess.run(["fio", "--parse-only", str(job)], capture_output=True).returncode == 0
    parsed = fiojob.load(job)
    first, second = parsed.jobs
    assert (first.name, first.section, first.options["description"]) == ("alpha", "first", "fio's other spellings")
    assert first.options["bs"] == 4096 and second.options["bs"] == 8192  # its own bs over the included one
    assert first.options["rw"] == "randrw" and first.options["rwmixread"] == 70
    assert first.options["directory"] == str(tmp_path) and second.name == "second"
    assert parsed.ignored == [f"{tmp_path / 'common.fio'}:2: option 'gtod_reduce' ignored: timing calls are cheap "
                              "here; every I/O is timed",
                              f"{job}:11: option 'thread' ignored: hpc-train iobench always runs a rank's jobs as "
                              "threads"]
    parsed.select(["second"])
    assert [j.name for j in parsed.jobs] == ["second"]
    with pytest.raises(JobFileError, match=re.escape(f"{job}: no job section [third] (sections: second)")):
        parsed.select(["third"])

    proc = iobench(job, "--section", "first", "--output-format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [j["jobname"] for j in json.loads(proc.stdout)["jobs"]] == ["alpha"]
    assert "option 'thread' ignored" in proc.stderr


def test_an_include_loop_is_an_error_not_a_recursion(tmp_path):
    (tmp_path / "a.fio").write_text("[a]\nsize=1m\ninclude b.fio\n")
    (tmp_path / "b.fio").write_text("include a.fio\n")
    with pytest.raises(JobFileError, match="includes nested more than 16 deep"):
        fiojob.load(tmp_path / "a.fio")


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (apt-get install fio)")
def test_fdatasync_and_unlink_do_what_fios_do(tmp_path):
    """64 writes with fdatasync=8: as many syncs as fio counts, and with unlink=1 no file is left."""
    job = tmp_path / "sync.fio"
    job.write_text(f"[global]\nbs=4k\nsize=256k\nrw=write\nfdatasync=8\nunlink=1\n"
                   f"[w]\ndirectory={tmp_path / 'files'}\nnumjobs=2\n")
    (tmp_path / "files").mkdir()
    theirs = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr
    fio_syncs = [(j["sync"]["total_ios"], j["sync"]["lat_ns"]["N"]) for j in json.loads(theirs.stdout)["jobs"]]
    assert list((tmp_path / "files").iterdir()) == []  # fio's unlink
    ours = run_mpi(2, python_cmd("-m", "hpc_train.cli", "iobench", str(job), "--output-format", "json"),
                   cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    # fio counts fdatasync calls in the latency's N only, and none after the last write: 7 of them
    ours_syncs = [(j["sync"]["total_ios"], j["sync"]["lat_ns"]["N"]) for j in json.loads(ours.stdout)["jobs"]]
    assert ours_syncs == fio_syncs == [(0, 7), (0, 7)]
    assert list((tmp_path / "files").iterdir()) == []  # files and markers, on both ranks
    with pytest.raises(JobFileError, match="set fsync= or fdatasync=, not both"):
        fiojob.parse("[a]\nsize=1m\nfsync=2\nfdatasync=2\n", "x.fio")


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (apt-get install fio)")
@pytest.mark.parametrize("limit", ["io_size=640k", "io_limit=96k", "number_ios=10", "io_size=1m\nnumber_ios=100"])
def test_io_size_and_number_ios_give_fios_counts(tmp_path, limit):
    """A 256 KiB region read at 4 KiB: io_size passes over it again (or stops short), number_ios stops
    early; the I/Os and bytes must be fio's on the same file."""
    job = tmp_path / "limit.fio"
    job.write_text(f"[global]\nbs=4k\nsize=256k\nrw=randread\n{limit}\n[r]\nfilename={tmp_path / 'data'}\n")
    theirs = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr
    ours = iobench(job, "--output-format", "json", "--overwrite", cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr

    def counts(doc):
        read = json.loads(doc)["jobs"][0]["read"]
        return read["total_ios"], read["io_bytes"]

    assert counts(ours.stdout) == counts(theirs.stdout)


def fio_and_ours(tmp_path, job):
    """fio's and our JSON documents of one job file, run on the same files."""
    theirs = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr
    ours = iobench(job, "--output-format", "json", "--overwrite", cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    return json.loads(theirs.stdout), json.loads(ours.stdout)


def busiest(shares: dict) -> str:
    return max(shares, key=lambda k: shares[k])


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (apt-get install fio)")
@pytest.mark.parametrize("engine", ["libaio", "io_uring", "posixaio"])
@pytest.mark.parametrize("depth", [1, 8])
def test_queued_engines_keep_fios_depth_and_counts(tmp_path, engine, depth):
    """randread of 1 MiB at 4 KiB with O_DIRECT: fio's I/O count and bytes, slat measured (fio's
    has one per I/O), and the depth tables in fio's busiest buckets, from fio's run of the same file."""
    job = tmp_path / "depth.fio"
    job.write_text(f"[global]\nioengine={engine}\niodepth={depth}\nbs=4k\nsize=1m\ndirect=1\nrw=randread\n"
                   f"[q]\nfilename={tmp_path / 'data'}\n")
    fio_doc, our_doc = fio_and_ours(tmp_path, job)
    fio_job, our_job = fio_doc["jobs"][0], our_doc["jobs"][0]
    assert schema_gaps(fio_doc, our_doc) == []
    for key in ("total_ios", "io_bytes"):
        assert our_job["read"][key] == fio_job["read"][key]
    assert our_job["read"]["slat_ns"]["N"] == fio_job["read"]["slat_ns"]["N"] == 256
    assert our_job["read"]["slat_ns"]["mean"] > 0
    for table in ("iodepth_level", "iodepth_submit", "iodepth_complete"):
        assert busiest(our_job[table]) == busiest(fio_job[table]), (table, our_job[table], fio_job[table])
    assert our_job["latency_depth"] == fio_job["latency_depth"] == depth


@pytest.mark.parametrize("engine", ["libaio", "io_uring", "posixaio"])
def test_queued_writes_land_where_they_were_aimed(tmp_path, engine):
    """Every 4 KiB block of a file written at depth 16 holds the job's buffer (a write lost, doubled
    or misplaced leaves the zeros written first), read back with plain Python."""
    data = tmp_path / "data"
    data.write_bytes(bytes(512 * 1024))
    job = tmp_path / "w.fio"
    job.write_text(f"[w]\nioengine={engine}\niodepth=16\niodepth_batch_submit=4\niodepth_batch_complete_min=2\n"
                   f"bs=4k\nsize=512k\ndirect=1\nrw=randwrite\nfilename={data}\n")
    proc = iobench(job, "--output-format", "json", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["jobs"][0]["write"]["total_ios"] == 128
    pattern = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()  # instance 0's buffer
    blocks = data.read_bytes()
    assert len(blocks) == 512 * 1024
    assert all(blocks[k : k + 4096] == pattern for k in range(0, len(blocks), 4096))


def test_sync_engines_report_no_slat_and_depth_one(tmp_path):
    job = tmp_path / "p.fio"
    job.write_text(f"[p]\nbs=4k\nsize=64k\nrw=read\nfilename={tmp_path / 'data'}\n")
    proc = iobench(job, "--output-format", "json", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["jobs"][0]
    assert entry["read"]["slat_ns"]["N"] == 0 and entry["read"]["clat_ns"]["N"] == 16
    assert entry["iodepth_level"]["1"] == 100.0 and entry["iodepth_submit"]["4"] == 100.0
