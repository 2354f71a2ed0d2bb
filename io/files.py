"""A job copy's files, as fio sets them up and visits them.

Names: `filename=` (a ':'-separated list, `\\:` for a colon in a name; every copy of the job
shares them), or `nrfiles` files named by `filename_format` ($jobname, $jobnum, $filenum; fio's
default `$jobname.$jobnum.$filenum`). Sizes: `filesize` (a size, or LOW-HIGH drawn per file),
or `size` split evenly (the first files a block larger where it does not divide), fio's rule;
each file's I/O region starts at the copy's offset. The job moves `size` bytes (at most what its
files hold; fio's rule), or `io_size`.

Order (`FileSet`): `file_service_type` as fio's: roundrobin (default), sequential (finish a file,
then the next) or random, each switching file every N I/Os (`:N`), with at most `openfiles`
open (a finished file makes room for the next); zipf, pareto and normal pick files by fio's
skew (the first files the hottest; never finished: a file whose offsets are used up starts
another pass). Each file has its own offsets (`Pattern`), from the copy's one random stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .pattern import Pattern, cut_to, normal_ranks, pareto_ranks, zipf_ranks

SERVICE_SHIFT = 10  # fio's FIO_FSERVICE_SHIFT: skewed picks are drawn over files << 10, then shifted back
SKEWED = ("zipf", "pareto", "normal")
SKEWED_BATCH = 1 << 16  # I/Os drawn at a time for a skewed file service
_KEYWORDS = re.compile(r"\$(jobname|jobnum|filenum)", re.IGNORECASE)


@dataclass
class FileRegion:
    """One file of a job copy: its path, where the copy's I/O region starts and how many bytes it
    spans, the size the file is laid out to (the largest any copy using it needs) and whether this
    copy lays it out (the first copy that uses it)."""

    path: object
    start: int
    length: int
    extent: int = 0
    owner: bool = True


def parse_file_service(text: str) -> tuple[str, tuple[float, ...]]:
    """file_service_type=roundrobin|sequential|random[:N] or zipf|pareto|normal|gauss[:VALUE[:CENTRE]]
    -> (kind, (N,)) or (kind, (value[, centre])) with fio's defaults (zipf 1.1, pareto 0.2, normal 0)."""
    from .fiojob import parse_distribution

    kind, sep, rest = text.strip().partition(":")
    kind = {"gauss": "normal"}.get(kind, kind)
    if kind in ("roundrobin", "sequential", "random"):
        every = int(rest) if sep else 1
        if every < 1:
            raise ValueError(f"{text!r}: switching files every {every} I/Os (N must be at least 1)")
        return kind, (every,)
    if kind in SKEWED:
        default = {"zipf": "1.1", "pareto": "0.2", "normal": "0"}[kind]
        return parse_distribution(f"{kind}:{rest if sep else default}")
    raise ValueError(f"{text!r}: expected roundrobin, sequential or random (each with an optional :N), "
                     "or zipf, pareto, normal (each with an optional :VALUE)")


def split_names(text: str) -> list[str]:
    """fio's filename=a:b:c, a backslash keeping a colon in a name."""
    return [name.replace("\\:", ":") for name in re.split(r"(?<!\\):", text) if name]


def file_names(job, jobnum: int) -> list[str]:
    o = job.options
    if o["filename"]:
        return split_names(o["filename"])
    names = []
    for k in range(o["nrfiles"]):
        fields = {"jobname": job.name, "jobnum": str(jobnum), "filenum": str(k)}
        names.append(_KEYWORDS.sub(lambda m, fields=fields: fields[m.group(1).lower()], o["filename_format"]))
    return names


def region_lengths(options: dict, count: int, start: int, rng: np.random.Generator) -> list[int]:
    """Each file's I/O bytes (fio's f->io_size): filesize less the start, or size split evenly."""
    o = options
    if o["filesize"]:
        low, high = o["filesize"]
        sizes = [low if low == high else int(rng.integers(low, high + 1)) // o["bs"] * o["bs"] for _ in range(count)]
        return [size - start for size in sizes]
    even = o["size"] // count
    extra = (o["size"] - even * count) // o["bs"]  # the first files take a block more
    return [even + (o["bs"] if k < extra else 0) for k in range(count)]


def job_bytes(options: dict, regions: list[FileRegion]) -> int:
    """What the copy moves in a loop: io_size, or size capped at its files' bytes (fio's rule)."""
    total = sum(region.length for region in regions)
    size = min(options["size"], total) if options["size"] else total
    return options["io_size"] or size


class FileSet:
    """The I/Os of one job copy over its files: (offsets, reads, sizes, files) a pass at a time."""

    def __init__(self, options: dict, regions: list[FileRegion], rng: np.random.Generator):
        self.o, self.rng, self.regions = options, rng, regions
        self.left = job_bytes(options, regions)
        self.kind, self.values = options["file_service_type"]
        self.patterns = [Pattern({**options, "size": region.length, "io_size": 0}, region.start, rng)
                         for region in regions]
        self.open_limit = min(options["openfiles"] or len(regions), len(regions))
        self.ranges = len(regions) << SERVICE_SHIFT
        if self.kind in SKEWED:  # where the hot files are: fixed for the copy, as fio's rand_off
            centre = self.values[1] if len(self.values) > 1 else None
            if centre is not None:
                self.shift = int(self.ranges * (centre - (0.5 if self.kind == "normal" else 0.0)))
            else:
                self.shift = 0 if self.kind == "normal" else int(rng.integers(self.ranges))
        self.opened: list[int] = []  # skewed, openfiles below nrfiles: the files the first draws opened

    def passes(self, mix: float):
        """Every pass of one of fio's loops until the job's bytes are done; a pass ends when every
        file is finished (roundrobin, sequential, random), or runs to the bytes (skewed picks)."""
        if len(self.regions) == 1:  # one file: its own passes, as many as the bytes take
            pattern = Pattern({**self.o, "size": self.regions[0].length, "io_size": self.left},
                              self.regions[0].start, self.rng)
            for columns in pattern.passes(mix):
                yield (*columns, np.zeros(len(columns[0]), np.int64))
            return
        left, unit = self.left, self.o["bs"]
        self.pending = [None] * len(self.regions)
        while left >= unit:
            if self.kind in SKEWED:  # in batches: a skewed pass runs to the bytes, however many
                columns = self._skewed(mix, min(left // unit, SKEWED_BATCH))
            else:
                columns = self._uniform(mix)
            offsets, reads, sizes, files = cut_to(columns, left, self.patterns[0])
            if not len(offsets):
                return
            left -= int(sizes.sum())
            yield offsets, reads, sizes, files

    def _one_pass(self, k: int, mix: float) -> tuple:
        return self.patterns[k].whole_pass(mix)

    def _uniform(self, mix: float) -> tuple:
        """One pass over every file, each file's I/Os in their order, interleaved as the service type says."""
        queues = [self._one_pass(k, mix) for k in range(len(self.regions))]
        lengths = np.array([len(q[0]) for q in queues], np.int64)
        files, positions = visit_order(lengths, self.kind, self.values[0], self.open_limit, self.rng)
        return _gather(queues, files, positions)

    def _skewed(self, mix: float, n: int) -> tuple:
        """n I/Os on files picked by fio's skewed draw: each file's offsets go on where its last
        batch stopped, into another pass of it when one is used up."""
        picks = self._picks(n)
        counts = np.bincount(picks, minlength=len(self.regions))
        queues = []
        for k, needed in enumerate(counts.tolist()):
            parts = [self.pending[k]] if self.pending[k] is not None else []
            while sum(len(part[0]) for part in parts) < needed:
                parts.append(self._one_pass(k, mix))
            queue = tuple(np.concatenate(column) for column in zip(*parts, strict=True)) if parts else \
                (np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64))
            self.pending[k] = tuple(column[needed:] for column in queue)
            queues.append(queue)
        return _gather(queues, picks, _occurrence(picks))

    def _picks(self, n: int) -> np.ndarray:
        """Up to n file numbers drawn as fio's zipf/pareto/normal file service (not hashed: the
        hot files are neighbours, from file 0 moved by the centre, or for zipf and pareto by a
        random offset where none is given)."""
        draw = {"zipf": zipf_ranks, "pareto": pareto_ranks, "normal": normal_ranks}[self.kind]
        picks = ((draw(self.rng, n, self.ranges, self.values[0]) + self.shift) % self.ranges) >> SERVICE_SHIFT
        if self.open_limit < len(self.regions):  # the first files drawn stay open; draws of others are drawn again
            numbers, first = np.unique(picks, return_index=True)
            fresh = [k for k in numbers[np.argsort(first)].tolist() if k not in self.opened]
            self.opened += fresh[: self.open_limit - len(self.opened)]
            picks = picks[np.isin(picks, self.opened)]
        return picks


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """For each entry, how many equal keys come before it."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    out = np.empty(len(keys), np.int64)
    out[order] = np.arange(len(keys)) - np.repeat(starts, counts)
    return out


def _gather(queues: list[tuple], files: np.ndarray, positions: np.ndarray) -> tuple:
    """(offsets, reads, sizes, files) of the I/Os at `positions` of the files' queues."""
    columns = []
    for column in range(3):
        joined = np.concatenate([q[column] for q in queues])
        base = np.concatenate([[0], np.cumsum([len(q[column]) for q in queues])[:-1]]).astype(np.int64)
        columns.append(joined[base[files] + positions])
    return (*columns, files.astype(np.int64))


def visit_order(lengths: np.ndarray, kind: str, every: int, open_limit: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(file, position in that file's queue) of every I/O of a pass over files of `lengths` I/Os.

    sequential: each file to its end, in order. roundrobin: `every` I/Os of each open file in
    turn. random: `every` I/Os of an open file drawn uniformly. A file's last I/O closes it,
    and the next file not yet used opens (at most `open_limit` open).
    """
    if kind == "sequential":
        files = np.repeat(np.arange(len(lengths)), lengths)
        return files, _occurrence(files)
    position = np.zeros(len(lengths), np.int64)
    waiting = [k for k in range(len(lengths)) if lengths[k] > 0]
    opened, waiting = waiting[:open_limit], waiting[open_limit:]
    out_files, out_positions = [], []
    while opened:
        members = np.array(opened)
        remaining = lengths[members] - position[members]
        if kind == "roundrobin":
            files, positions = _round_robin(members, position[members], remaining, every)
        else:
            files, positions = _random_runs(members, position[members], remaining, every, rng)
        out_files.append(files)
        out_positions.append(positions)
        np.add.at(position, files, 1)
        still = [k for k in opened if position[k] < lengths[k]]
        room = open_limit - len(still)
        opened, waiting = sorted(still + waiting[:room]), waiting[room:]
    if not out_files:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_files), np.concatenate(out_positions)


def _round_robin(members, start, remaining, every):
    """Rounds of `every` I/Os per file, in file order, until the first file finishes."""
    rounds = int((-(-remaining // every)).min())
    counts = np.minimum(rounds * every, remaining)
    files = np.repeat(members, counts)
    within = _occurrence(files)
    order = np.lexsort((within, files, within // every))
    return files[order], (np.repeat(start, counts) + within)[order]


def _random_runs(members, start, remaining, every, rng):
    """Runs of `every` I/Os, each on a file drawn uniformly, until the first file finishes (a run
    ends early where its file does)."""
    slots = np.repeat(rng.integers(0, len(members), -(-int(remaining.sum()) // every) + 1), every)
    within = _occurrence(slots)
    done = np.flatnonzero(within == remaining[slots] - 1)
    slots = slots[: done[0] + 1] if len(done) else slots
    within = within[: len(slots)]
    return members[slots], start[slots] + within
