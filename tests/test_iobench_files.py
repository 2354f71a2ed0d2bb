"""Several files per job (nrfiles, filesize, filename_format, file_service_type, openfiles,
filename=a:b), against fio 3.33 on the same job files: the order fio's debug log shows it
visiting files and offsets, its counts and bytes, the sizes it lays files out to."""

from __future__ import annotations

import collections
import re
import struct
import subprocess

import numpy as np
import pytest
from hpc_train.io import fiojob, iobench
from hpc_train.io.files import FileSet

from hpc_train.errors import JobFileError

from .test_iobench import fio_and_ours
from .test_iobench import iobench as run_iobench
from .test_iobench_options import needs_fio

QUEUED = re.compile(r"queue: io_u \S+ off=0x([0-9a-f]+),len=0x([0-9a-f]+),ddir=\d,file=(\S+)")


def fio_visits(tmp_path, text: str) -> list[tuple[str, int, int]]:
    """(file name, offset, length) of every I/O fio queues for this job file, in order (--debug=io)."""
    job = tmp_path / "fio.fio"
    job.write_text(text)
    out = subprocess.run(["fio", "--output-format=json", "--debug=io", str(job)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, check=True).stdout
    return [(m.group(3), int(m.group(1), 16), int(m.group(2), 16)) for m in QUEUED.finditer(out)]


def our_visits(text: str) -> list[tuple[str, int, int]]:
    """The same, as our first job copy would issue them (one loop)."""
    inst = iobench.instances(fiojob.parse(text).jobs)[0]
    files = FileSet(inst.job.options, inst.files, np.random.default_rng(iobench.seed(inst)))
    return [(inst.files[f].path.name, offset, size) for offsets, _, sizes, numbers in files.passes(1.0)
            for offset, size, f in zip(offsets.tolist(), sizes.tolist(), numbers.tolist(), strict=True)]


@needs_fio
@pytest.mark.parametrize("options", [
    "nrfiles=4",
    "nrfiles=4\nfile_service_type=roundrobin:3",
    "nrfiles=4\nfile_service_type=sequential",
    "nrfiles=5\nsize=80k\nopenfiles=3",
    "nrfiles=5\nsize=80k\nopenfiles=2\nfile_service_type=roundrobin:3",
    "nrfiles=3\nsize=48k\nio_size=80k",
    "nrfiles=4\noffset=8k\nfilesize=24k",
    "nrfiles=2\nfilesize=16k\nsize=16k",
    "nrfiles=2\nrw=read:4k",
    "filename=left:right\nsize=32k",
    "nrfiles=2\nfilename_format=data.$filenum.$jobname",
])
def test_files_are_visited_in_fios_order(tmp_path, options):
    text = f"[j]\nbs=4k\nsize=64k\nrw=read\n{options}\n"
    assert our_visits(text) == fio_visits(tmp_path, text)


@needs_fio
@pytest.mark.parametrize("service", ["random", "random:4", "roundrobin"])
def test_random_offsets_and_random_files_cover_what_fio_does(tmp_path, service):
    """Random offsets in every file, files picked at random: the I/Os each file gets and the
    blocks each file is read at are fio's (each block of each file once a pass)."""
    text = f"[j]\nbs=4k\nsize=128k\nrw=randread\nnrfiles=4\nfile_service_type={service}\n"
    theirs, ours = fio_visits(tmp_path, text), our_visits(text)
    assert sorted(ours) == sorted(theirs) and len(ours) == 32


@needs_fio
@pytest.mark.parametrize("service", ["zipf:1.2:0", "pareto:0.3:0", "normal:20"])
def test_skewed_file_service_picks_files_as_fio(tmp_path, service):
    """zipf/pareto/normal over 16 files: the share of I/Os on the busiest files, as fio's. The
    centre is pinned (0: the hot ranks start at file 0): left out, fio moves zipf's and pareto's hot
    ranks by a random offset, which may split the hottest ranks over two files or not."""
    text = f"[j]\nbs=4k\nsize=1m\nrw=randread\nnrfiles=16\nfile_service_type={service}\n"

    def shares(visits):
        counts = sorted(collections.Counter(name for name, _, _ in visits).values(), reverse=True)
        return [sum(counts[:k]) / len(visits) for k in (1, 4)]

    theirs, ours = fio_visits(tmp_path, text), our_visits(text)
    assert len(ours) == len(theirs) == 256
    assert np.allclose(shares(ours), shares(theirs), atol=0.12), (shares(ours), shares(theirs))


HEADER = struct.Struct("<8sQI")  # io/verify.py: magic, the block's offset, its length


def stamped_blocks(path, bs: int = 4096) -> list[int]:
    """The blocks of a file that carry our verify header naming their own place."""
    data = path.read_bytes()
    return [k for k in range(len(data) // bs)
            if HEADER.unpack_from(data, k * bs) == (b"HTIOVRFY", k * bs, bs)]


@needs_fio
@pytest.mark.parametrize("engine", ["psync", "libaio", "io_uring"])
def test_a_write_job_over_several_files_lands_every_block_and_counts_as_fio(tmp_path, engine):
    """randwrite over 3 files (random file service) with verify: fio's counts and file sizes; on
    disk (the witness) every block of every file's region written once; a read job over the same
    files checks them, and a damaged block fails it naming the file and the offset."""
    job = tmp_path / "w.fio"
    depth = "iodepth=4\n" if engine != "psync" else ""  # fio notes on stdout that psync caps it at 1
    job.write_text(f"[w]\nioengine={engine}\n{depth}bs=4k\nsize=192k\nrw=randwrite\nnrfiles=3\n"
                   "file_service_type=random:2\nverify=crc32c\n")
    fio_doc, our_doc = fio_and_ours(tmp_path, job)
    for direction in ("read", "write"):
        assert our_doc["jobs"][0][direction]["total_ios"] == fio_doc["jobs"][0][direction]["total_ios"] == 48
    files = [tmp_path / f"w.0.{k}" for k in range(3)]
    assert [f.stat().st_size for f in files] == [64 << 10] * 3  # fio laid them out to these; we ran second
    assert [stamped_blocks(f) for f in files] == [list(range(16))] * 3

    read = tmp_path / "r.fio"
    read.write_text(f"[r]\nioengine={engine}\nbs=4k\nsize=192k\nrw=read\nnrfiles=3\nfilename_format=w.0.$filenum\n"
                    "verify=crc32c\n")
    assert run_iobench(read, cwd=tmp_path).returncode == 0
    damaged = bytearray(files[2].read_bytes())
    damaged[5 * 4096 + 100] ^= 0xFF
    files[2].write_bytes(damaged)
    proc = run_iobench(read, cwd=tmp_path)
    assert proc.returncode == 1 and f"w.0.2: verify (crc32c) failed at offset {5 * 4096}" in proc.stderr


def test_files_shared_by_copies_are_laid_out_once_and_unlinked_once(tmp_path):
    """filename=a:b with numjobs=2 (both copies on both files), and a filename_format without
    $jobnum: each file laid out once, to the furthest region; unlink=1 leaves nothing."""
    text = f"[s]\ndirectory={tmp_path}\nbs=4k\nsize=64k\nrw=read\nnumjobs=2\noffset_increment=32k\n" \
        "nrfiles=2\nfilename_format=shared.$filenum\n"
    inst = iobench.instances(fiojob.parse(text).jobs)
    assert [[(r.path.name, r.start, r.length, r.extent, r.owner) for r in i.files] for i in inst] == [
        [("shared.0", 0, 32768, 65536, True), ("shared.1", 0, 32768, 65536, True)],
        [("shared.0", 32768, 32768, 65536, False), ("shared.1", 32768, 32768, 65536, False)]]
    job = tmp_path / "s.fio"
    job.write_text(text)
    assert run_iobench(job, cwd=tmp_path).returncode == 0
    assert {p.name: p.stat().st_size for p in tmp_path.glob("shared.?")} == {"shared.0": 65536, "shared.1": 65536}
    job.write_text(text + "unlink=1\n")
    assert run_iobench(job, cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.fio"]


@pytest.mark.parametrize("text, message", [
    ("[a]\nsize=1m\nnrfiles=2\nioengine=mpiio\n", "several files per job (nrfiles=, filename=a:b) work with"),
    ("[a]\nsize=1m\nfilename=x:y\nioengine=hdf5\n", "several files per job"),
    ("[a]\nsize=1m\nfile_service_type=sideways\n", "bad value for option 'file_service_type'"),
    ("[a]\nsize=1m\nfile_service_type=random:0\n", "N must be at least 1"),
    ("[a]\nsize=1m\nfile_service_type=zipf:1\n", "zipf needs theta > 0, not 1"),
    ("[a]\nfilesize=4k\noffset=8k\n", "filesize less the last copy's offset (-4096) must be at least"),
    ("[a]\nsize=8k\nnrfiles=4\n", "size / nrfiles (2048) must be at least the largest block size (4096)"),
    ("[a]\nfilesize=64k-16k\n", "bad value for option 'filesize'"),
])
def test_file_option_errors_name_the_job(text, message):
    with pytest.raises(JobFileError, match=re.escape(message)):
        fiojob.parse(text, "x.fio")


def test_filesize_ranges_draw_aligned_sizes_within_bounds_and_size_defaults_to_their_sum(tmp_path):
    inst = iobench.instances(fiojob.parse("[r]\nbs=4k\nfilesize=16k-64k\nnrfiles=32\nrw=read\n").jobs)[0]
    sizes = [r.length for r in inst.files]
    assert all(16384 <= s <= 65536 and s % 4096 == 0 for s in sizes) and len(set(sizes)) > 3
    rounds = list(FileSet(inst.job.options, inst.files, np.random.default_rng(0)).passes(1.0))
    assert sum(int(sizes_.sum()) for _, _, sizes_, _ in rounds) == sum(sizes)  # size unset: every file's bytes
