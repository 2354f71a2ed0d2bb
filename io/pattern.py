"""Where and when a job's I/Os go: fio's offset patterns, random distributions and rate limits.

Offsets (`Pattern`): sequential passes over the job's region (with fio's holes,
`rw=read:4k`), or random ones: every block once per pass (fio's random map), or
drawn independently (`norandommap`, and every non-uniform `random_distribution`:
zipf, pareto and normal as fio's lib/zipf.c and lib/gauss.c compute them, the hot ranks
scattered over the region as fio hashes them), with `rw=randread:N` taking N-1
sequential blocks after each random one; sizes drawn per I/O where a job has several
(bssplit, bsrange). `randrepeat=1` (fio's default) makes the pattern the same on every
run; `randseed` chooses another.

Timing (`Pacer`): `rate`/`rate_iops` (per job copy, reads and writes apart) and
`rate_process` (linear, or poisson gaps), enforced between the runs handed to an
engine, which are cut to about a millisecond of I/O when a rate is set.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

CHUNK = 4096  # I/Os handed to an engine at once
PIECE = 1 << 18  # I/Os of a one-size pass made at a time (~20 MB of columns; a 1 TiB region at 4 KiB holds 268 M)
ZIPF_MAX_TERMS = 10_000_000  # fio's ZIPF_MAX_GEN: the zeta sum stops there
GOLDEN = 0.6180339887


def _scramble(ranks: np.ndarray, blocks: int) -> np.ndarray:
    """Spread the hot ranks of a skewed distribution over the region (fio hashes them): rank times
    a multiplier prime to the block count, modulo it (a bijection; in int64 below 2^31 blocks)."""
    multiplier = max(1, int(blocks * GOLDEN))
    while math.gcd(multiplier, blocks) != 1:
        multiplier += 1
    if blocks < 1 << 31:
        return ranks * multiplier % blocks
    return np.array([r * multiplier % blocks for r in ranks.tolist()], np.int64)


@functools.lru_cache(maxsize=64)  # once per region and theta, not per pass
def _zeta(n: int, theta: float) -> float:
    """sum of k^-theta for k = 1..n (at most fio's ZIPF_MAX_GEN terms), a MiB of terms at a time."""
    n, step, total = min(n, ZIPF_MAX_TERMS), 1 << 17, 0.0
    for lo in range(1, n + 1, step):
        total += float(np.sum(np.arange(lo, min(n + 1, lo + step), dtype=np.float64) ** -theta))
    return total


def zipf_ranks(rng: np.random.Generator, n: int, blocks: int, theta: float) -> np.ndarray:
    """n ranks in [0, blocks) with P(k) ~ (k+1)^-theta (Gray et al., as fio's zipf_next)."""
    zetan, zeta2 = _zeta(blocks, theta), _zeta(2, theta)
    alpha = 1.0 / (1.0 - theta)
    eta = (1.0 - (2.0 / blocks) ** (1.0 - theta)) / (1.0 - zeta2 / zetan) if blocks > 2 else 1.0
    u = rng.random(n)
    uz = u * zetan
    ranks = np.floor(blocks * np.power(np.maximum(eta * u - eta + 1.0, 0.0), alpha)).astype(np.int64)
    ranks = np.where(uz < 1.0 + 0.5**theta, 1, ranks)
    ranks = np.where(uz < 1.0, 0, ranks)
    return np.clip(ranks, 0, blocks - 1)


def pareto_ranks(rng: np.random.Generator, n: int, blocks: int, h: float) -> np.ndarray:
    """fio's pareto_next: (blocks - 1) * u^(log h / log(1 - h))."""
    power = math.log(h) / math.log(1.0 - h)
    return np.clip(((blocks - 1) * np.power(rng.random(n), power)).astype(np.int64), 0, blocks - 1)


def normal_ranks(rng: np.random.Generator, n: int, blocks: int, deviation: float) -> np.ndarray:
    """fio's normal (lib/gauss.c): the mean of 12 uniform draws over [0, blocks], rounded up, moved
    by a uniform jitter of width deviation % of the blocks (at most half of them), halved while it would
    pass the end; the ranks are then scattered as zipf's and pareto's are."""
    total = np.zeros(n, np.int64)
    for _ in range(12):
        total += rng.integers(0, blocks + 1, n)
    ranks = -(-total // 12)
    width = min(int(blocks * deviation / 100), blocks // 2)
    jitter = np.floor(width * rng.random(n)).astype(np.int64) - width // 2
    while (over := ranks + jitter >= blocks).any():
        jitter[over] = np.trunc(jitter[over] / 2).astype(np.int64)
    return (ranks + jitter) % blocks


class Permutation:
    """A pseudo-random bijection of [0, n): fio's random map for a pass, evaluated a piece at a time
    with no table of n entries. A 4-round Feistel network over the next even number of bits, with
    values that land outside [0, n) moved on through it until they are inside (cycle walking:
    still a bijection, and the domain is under 4n, so few walk)."""

    MIX = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, n: int, rng: np.random.Generator):
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.n, self.half = n, np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [np.uint64(k) for k in rng.integers(0, 1 << 62, 4)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            mixed = (right + key) * self.MIX  # wraps modulo 2^64
            left, right = right, left ^ ((mixed ^ (mixed >> np.uint64(29))) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        out = self._encrypt(index.astype(np.uint64))
        outside = np.flatnonzero(out >= self.n)
        while len(outside):
            out[outside] = self._encrypt(out[outside])
            outside = outside[out[outside] >= self.n]
        return out.astype(np.int64)


class Pattern:
    """The offsets and sizes of one job copy's I/Os, a pass over its region at a time.

    One block size: every block once a pass (sequential, or the random map), or `blocks` draws.
    Several (bssplit, bsrange): each I/O's size drawn by its direction's shares, offsets aligned
    to the smallest size (fio's default blockalign); a pass covers the region's bytes once:
    sequential I/Os back to back (the last cut at the end), the random map handing out free
    blocks and cutting an I/O where the next block is taken (as fio's map does), independent
    draws placed so they end inside the region.
    """

    def __init__(self, options: dict, start: int, rng: np.random.Generator):
        o = options
        self.o, self.start, self.rng = o, start, rng
        self.unit = o["bs"]  # the smallest block size: offsets are multiples of it
        self.blocks = o["size"] // self.unit
        self.random = o["rw"].startswith("rand")
        self.every = o["rw_every"]  # rand: a new random offset every N I/Os; sequential: a hole of N bytes
        self.variable = o["bs_max"] != o["bs"] or any(len(sizes) > 1 for sizes, _ in o["block_sizes"])
        self.mapped = self.random and not o["norandommap"] and o["random_distribution"][0] == "random"

    def _random_blocks(self, n: int) -> np.ndarray:
        """n blocks drawn independently by the job's distribution (not the random map)."""
        name, values = self.o["random_distribution"]
        blocks = self.blocks
        if name == "random":
            return self.rng.integers(0, blocks, n)
        if name == "zipf":
            picked = _scramble(zipf_ranks(self.rng, n, blocks, values[0]), blocks)
        elif name == "pareto":
            picked = _scramble(pareto_ranks(self.rng, n, blocks, values[0]), blocks)
        else:
            picked = _scramble(normal_ranks(self.rng, n, blocks, values[0]), blocks)
        centre = values[1] if len(values) > 1 else 0.0
        return (picked + int(centre * blocks)) % blocks

    def one_pass(self):
        """Offsets of one pass of a one-size job, in pieces of at most PIECE: every block once
        (sequential, or the random map), or `blocks` draws; with rw=randX:N, runs of N blocks from
        a random head each."""
        bs, blocks = self.unit, self.blocks
        if not self.random:
            count = (blocks * bs - bs) // (bs + self.every) + 1
            for lo in range(0, count, PIECE):
                yield self.start + np.arange(lo, min(count, lo + PIECE), dtype=np.int64) * (bs + self.every)
            return
        permutation = Permutation(blocks, self.rng) if self.mapped else None
        every = max(1, self.every)
        heads, step = -(-blocks // every), max(1, PIECE // every)
        for lo in range(0, heads, step):
            hi = min(heads, lo + step)
            picked = permutation(np.arange(lo, hi)) if permutation else self._random_blocks(hi - lo)
            runs = (picked[:, None] + np.arange(every)[None, :]) % blocks
            yield self.start + runs.reshape(-1)[: blocks - lo * every] * bs

    def _sizes(self, reads: np.ndarray) -> np.ndarray:
        """Each I/O's size, drawn from its direction's sizes by their shares."""
        sizes = np.zeros(len(reads), np.int64)
        for direction, pick in ((0, reads), (1, ~reads)):
            choices, shares = self.o["block_sizes"][direction]
            sizes[pick] = np.asarray(choices)[self.rng.choice(len(choices), int(pick.sum()), p=shares)]
        return sizes

    def _fit(self, reading: bool, room: int) -> int:
        """A size for an I/O that must fit in `room` bytes: drawn by share among its direction's
        sizes that fit (fio draws again until one does), or `room` itself where none does."""
        choices, shares = self.o["block_sizes"][0 if reading else 1]
        fitting = [k for k, size in enumerate(choices) if size <= room]
        if not fitting:
            return room
        weights = np.asarray([shares[k] for k in fitting])
        return int(choices[fitting[self.rng.choice(len(fitting), p=weights / weights.sum())]])

    def _tail(self, position: int, region: int, reading: bool, mix: float) -> list[tuple[int, bool, int]]:
        """I/Os from `position` (sequential: the offset; random: the bytes done) to the pass's end,
        each sized to fit what is left."""
        out = []
        while position < region:
            size = self._fit(reading, region - position)
            if self.random:
                offset = min(int(self._random_blocks(1)[0]), (region - size) // self.unit) * self.unit
            else:
                offset = position
            out.append((offset, reading, size))
            position += size + (0 if self.random else self.every)
            reading = bool(self.rng.random() < mix)
        return out

    def _variable_pass(self, mix: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pass of a several-size job: (offsets, reads, sizes) covering the region's bytes once."""
        region, unit = self.blocks * self.unit, self.unit
        reads = self.rng.random(self.blocks) < mix  # at most one I/O per block
        sizes = self._sizes(reads)
        if self.mapped:
            offsets, sizes = self._mapped(sizes)
            return self.start + offsets, reads[: len(offsets)], sizes
        if not self.random:  # back to back (with holes)
            offsets = np.concatenate([[0], np.cumsum(sizes + self.every)[:-1]])
            ends = offsets + sizes
        else:  # independent draws, each placed to end inside the region, until its bytes are done
            room = np.maximum((region - sizes) // unit, 0)
            offsets = np.minimum(self._random_blocks(len(sizes)), room) * unit
            ends = np.cumsum(sizes)
        n = int(np.searchsorted(ends, region, side="right"))  # those that fit whole; the rest drawn to fit
        position = int(ends[n - 1] + (0 if self.random else self.every)) if n else 0
        tail = self._tail(position, region, bool(reads[n]) if n < len(reads) else True, mix)
        columns = (offsets[:n], reads[:n], sizes[:n])
        if tail:
            added = zip(*tail, strict=True)  # offsets, reads, sizes of the I/Os drawn to fit
            columns = tuple(np.concatenate([column, np.asarray(values, column.dtype)])
                            for column, values in zip(columns, added, strict=True))
        return self.start + columns[0], columns[1], columns[2]

    def _mapped(self, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """fio's random map with several sizes: a random free block, the I/O cut where a taken block
        or the region's end comes first; until every block is taken."""
        free = np.ones(self.blocks, bool)
        order, position, offsets, cut = self.rng.permutation(self.blocks), 0, [], []
        for size in sizes.tolist():
            while position < self.blocks and not free[order[position]]:
                position += 1
            if position == self.blocks:
                break
            first = int(order[position])
            want = -(-size // self.unit)
            last = first
            while last + 1 < min(self.blocks, first + want) and free[last + 1]:
                last += 1
            free[first : last + 1] = False
            offsets.append(first * self.unit)
            cut.append(min(size, (last + 1 - first) * self.unit))
        return np.array(offsets, np.int64), np.array(cut, np.int64)

    def pieces(self, mix: float):
        """(offsets, reads, sizes) of one pass: a several-size one whole, a one-size one in pieces."""
        if self.variable:
            yield self._variable_pass(mix)
            return
        for offsets in self.one_pass():
            yield offsets, self.rng.random(len(offsets)) < mix, np.full(len(offsets), self.unit, np.int64)

    def whole_pass(self, mix: float) -> tuple:
        """One pass's (offsets, reads, sizes) in one piece (where passes are interleaved: files)."""
        return tuple(np.concatenate(column) for column in zip(*self.pieces(mix), strict=True))

    def passes(self, mix: float):
        """(offsets, reads, sizes) of every pass of one of fio's loops, a piece at a time, until
        io_size bytes (default: size) are done (`cut_to`)."""
        left = self.o["io_size"] or self.o["size"]
        while left >= self.unit:
            for columns in self.pieces(mix):
                offsets, reads, sizes = cut_to(columns, left, self)
                left -= int(sizes.sum())
                yield offsets, reads, sizes
                if left < self.unit:
                    return


def cut_to(columns: tuple, left: int, pattern: Pattern) -> tuple:
    """The I/Os of `columns` (offsets, reads, sizes, ...) up to `left` bytes: whole I/Os of a
    one-size job (fio's count), the one that would pass `left` otherwise given a size that fits."""
    sizes = columns[2]
    done = np.cumsum(sizes)
    if not len(sizes) or done[-1] <= left:
        return columns
    if not pattern.variable:
        return tuple(column[: left // pattern.unit] for column in columns)
    n = int(np.searchsorted(done, left)) + 1
    columns = tuple(column[:n] for column in columns)
    sizes = columns[2].copy()
    if done[n - 1] > left:
        sizes[-1] = pattern._fit(bool(columns[1][-1]), left - int(done[n - 1] - sizes[-1]))
    return (*columns[:2], sizes, *columns[3:])


class _Stream:
    """The I/Os of every loop as one stream, taken a run at a time (runs may span passes)."""

    def __init__(self, options: dict, pattern, mix: float):
        self.pieces = self._loops(options, pattern, mix)
        empty = np.zeros(0, np.int64)
        self.columns = (empty, np.zeros(0, bool), empty, empty)  # offsets, reads, sizes, files

    @staticmethod
    def _loops(o: dict, pattern, mix: float):
        loop = 0
        while True:
            yield from pattern.passes(mix)
            loop += 1
            if not o["time_based"] and loop >= o["loops"]:
                return

    def peek(self, n: int) -> tuple:
        """Up to n of the next I/Os (fewer only at the end) as (offsets, reads, sizes, files), not taken."""
        pieces, have = [self.columns], len(self.columns[0])
        while have < n and (piece := next(self.pieces, None)) is not None:
            pieces.append(piece)
            have += len(piece[0])
        if len(pieces) > 1:
            self.columns = tuple(np.concatenate(column) for column in zip(*pieces, strict=True))
        return tuple(column[:n] for column in self.columns)

    def take(self, n: int) -> None:
        self.columns = tuple(column[n:] for column in self.columns)


def chunks(options: dict, pattern, mix: float, chunk: int = CHUNK):
    """The I/Os of `pattern` (a FileSet: passes of (offsets, reads, sizes, files)) as (offsets, reads,
    sizes, files, sync_first) runs for an engine: a run ends where fio
    syncs (before the I/O after every fsync=/fdatasync= Nth write), at number_ios, or at
    `chunk` I/Os (so a time-based job checks its clock, a rate holds, and memory stays bounded)."""
    o = options
    sync_every, left = o["fsync"] or o["fdatasync"], o["number_ios"] or -1
    stream = _Stream(o, pattern, mix)
    writes_since_sync, sync_first = 0, False
    while left != 0:
        offsets, reads, sizes, files = stream.peek(chunk if left < 0 else min(chunk, left))
        if not len(offsets):
            return
        cut, synced = len(offsets), False
        if sync_every:
            writes = writes_since_sync + np.cumsum(~reads)
            nth = np.flatnonzero(writes == sync_every)
            if len(nth):  # the Nth write ends the run; the sync precedes the next I/O, if any
                cut, synced = int(nth[0]) + 1, True
            writes_since_sync = 0 if synced else int(writes[-1])
        stream.take(cut)
        yield offsets[:cut], reads[:cut], sizes[:cut], files[:cut], sync_first
        sync_first = synced
        left -= cut


class Pacer:
    """fio's rate limits for one job copy: bytes/s from `rate`, or IOPS x bs from `rate_iops`, for
    reads and writes apart; linear (evenly spaced) or poisson (exponential gaps, fio's rate_process)."""

    def __init__(self, options: dict, rng: np.random.Generator):
        o, bs = options, options["bs"]  # rate_iops counts in the smallest block size, as fio's
        self.rates = [max(o["rate"][k], o["rate_iops"][k] * bs) for k in (0, 1)]  # reads, writes; 0: no limit
        self.poisson = o["rate_process"] == "poisson"
        self.bs, self.rng = bs, rng
        self.due = [0.0, 0.0]  # seconds after the start when the next I/O of each direction may go

    @property
    def active(self) -> bool:
        return any(self.rates)

    def chunk(self) -> int:
        """I/Os per run: about a millisecond's worth at the fastest limited rate (one for poisson)."""
        if self.poisson:
            return 1
        fastest = max(self.rates) / self.bs
        return int(min(CHUNK, max(1, fastest / 1000)))

    def wait(self, reads: np.ndarray, sizes: np.ndarray, start_ns: int) -> None:
        """Sleep until this run may go, then book its I/Os (each for its bytes at its direction's rate)."""
        due = 0.0
        for direction, pick in ((0, reads), (1, ~reads)):
            if not pick.any() or not self.rates[direction]:
                continue
            due = max(due, self.due[direction])
            gaps = sizes[pick] / self.rates[direction]
            self.due[direction] += float(self.rng.exponential(gaps).sum() if self.poisson else gaps.sum())
        delay = due - (time.perf_counter_ns() - start_ns) / 1e9
        if delay > 0:
            time.sleep(delay)
