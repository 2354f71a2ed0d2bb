"""fio job files: INI sections, fio's option names and aliases, units and bare flags,
`${VAR}` expansion and `include FILE` lines.

`[global]` options apply to the jobs defined after it (fio's rule; a later
`[global]` adds to them). An option we do not implement and a bad value raise JobFileError
naming the file, the line and the option (never ignored silently); options that only tune
fio's own workings (IGNORED) are accepted and reported as ignored.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import JobFileError
from ..units import parse_size
from .engines import ENGINES
from .files import parse_file_service, split_names

RW_MODES = {"read": "read", "write": "write", "randread": "randread", "randwrite": "randwrite",
            "rw": "rw", "readwrite": "rw", "randrw": "randrw"}
DEFAULT_PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9,
                       99.95, 99.99)
_TIME = re.compile(r"^(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?$", re.IGNORECASE)
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_seconds(text: str) -> float:
    """fio times: plain numbers are seconds; us, ms, s, m, h, d suffixes."""
    match = _TIME.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a time (e.g. 30, 500ms, 2m)")
    return float(match.group(1)) * _TIME_UNITS[(match.group(2) or "s").lower()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (0 or 1)")


def parse_int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        value = int(text.strip())
        if value < low or (high is not None and value > high):
            raise ValueError(f"{value} is outside [{low}, {high if high is not None else 'inf'}]")
        return value

    return parse


def parse_rw(text: str) -> dict:
    """rw=MODE[:N]: random modes take a new random offset every N I/Os (sequential in between),
    sequential ones skip N bytes after every I/O (fio's holes)."""
    mode, _, every = text.strip().partition(":")
    if mode not in RW_MODES:
        raise ValueError(f"{text!r}: expected one of {', '.join(RW_MODES)}, optionally :N")
    return {"rw": RW_MODES[mode], "rw_every": parse_size(every) if every else 0}


def parse_choice(*choices: str, aliases: dict | None = None):
    def parse(text: str) -> str:
        value = (aliases or {}).get(text.strip(), text.strip())
        if value not in choices:
            raise ValueError(f"{text!r}: expected one of {', '.join([*choices, *(aliases or {})])}")
        return value

    return parse


def parse_pair(parse_one):
    """fio's per-direction values: `a,b` for reads and writes, `a` for both, `,b` or `a,` for one."""
    def parse(text: str) -> tuple:
        parts = text.split(",")
        if len(parts) > 2:
            raise ValueError(f"{text!r}: give one value, or reads,writes (trim is not run here)")
        if len(parts) == 1:
            return (parse_one(parts[0]),) * 2
        return tuple(parse_one(p) if p.strip() else 0 for p in parts)

    return parse


def parse_time_range(text: str) -> tuple[float, float]:
    """startdelay=T or T1-T2 (a random delay in the range, per job copy)."""
    low, _, high = text.partition("-")
    bounds = (parse_seconds(low), parse_seconds(high) if high else parse_seconds(low))
    if bounds[1] < bounds[0]:
        raise ValueError(f"{text!r}: the range ends before it starts")
    return bounds


def parse_size_range(text: str) -> tuple[int, int]:
    """SIZE or LOW-HIGH (filesize=): bounds in bytes, LOW <= HIGH, both positive."""
    low, sep, high = text.partition("-")
    bounds = (parse_size(low), parse_size(high) if sep else parse_size(low))
    if not 0 < bounds[0] <= bounds[1]:
        raise ValueError(f"{text!r}: expected SIZE or LOW-HIGH with 0 < LOW <= HIGH")
    return bounds


def parse_bsrange(text: str) -> tuple:
    """bsrange=LOW-HIGH (or reads,writes): a size from LOW to HIGH in steps of LOW, uniformly."""
    return parse_pair(lambda part: parse_size_range(part) if part.strip() else None)(text)


MAX_SPLIT_ENTRIES = 64  # fio's BSSPLIT_MAX


def parse_bssplit(text: str) -> tuple:
    """bssplit=SIZE/PERCENT:SIZE/PERCENT... (or reads,writes): sizes by share; a blank share takes
    an even part of what the others leave, as fio's; the shares make 100."""
    def one(part: str) -> tuple[tuple[int, float], ...] | None:
        if not part.strip():
            return None
        entries = []
        for entry in part.split(":"):
            size, _, share = entry.partition("/")
            entries.append((parse_size(size), float(share) if share.strip() else None))
        if len(entries) > MAX_SPLIT_ENTRIES or any(size <= 0 for size, _ in entries):
            raise ValueError(f"{part!r}: at most {MAX_SPLIT_ENTRIES} entries of positive sizes")
        given = sum(share for _, share in entries if share is not None)
        blank = sum(share is None for _, share in entries)
        if any(share is not None and not 0 <= share <= 100 for _, share in entries) or given > 100 or \
                (not blank and abs(given - 100) > 1e-6):
            raise ValueError(f"{part!r}: the shares must be percentages that make 100")
        fill = (100 - given) / blank if blank else 0.0
        return tuple((size, fill if share is None else share) for size, share in entries)

    return parse_pair(one)(text)


DISTRIBUTIONS = {  # name -> (check of the first value, what it is)
    "random": None,
    "zipf": (lambda v: v > 0 and v != 1, "theta > 0, not 1"),
    "pareto": (lambda v: 0 < v < 1, "h in (0, 1)"),
    "normal": (lambda v: 0 <= v <= 100, "a deviation of 0..100 (% of the region)"),
}


def parse_distribution(text: str) -> tuple[str, tuple[float, ...]]:
    """random_distribution=random | zipf:THETA | pareto:H | normal:DEV (gauss too), each with an
    optional :CENTRE in [0, 1] that shifts the hot spot."""
    name, *values = text.strip().split(":")
    name = {"gauss": "normal"}.get(name, name)
    if name not in DISTRIBUTIONS:
        raise ValueError(f"{text!r}: expected random, zipf:THETA, pareto:H or normal:DEV")
    if name == "random":
        return name, ()
    if not 1 <= len(values) <= 2:
        raise ValueError(f"{text!r}: {name} needs one value (and an optional centre), e.g. {name}:0.5")
    numbers = tuple(float(v) for v in values)
    check, meaning = DISTRIBUTIONS[name]
    centre_ok = len(numbers) < 2 or 0 <= numbers[1] <= 1
    if not all(math.isfinite(v) for v in numbers) or not check(numbers[0]) or not centre_ok:
        raise ValueError(f"{text!r}: {name} needs {meaning}, and a centre in [0, 1]")
    return name, numbers


def parse_engine(text: str) -> str:
    if text.strip() not in ENGINES:
        raise ValueError(f"ioengine {text!r} is not supported here: use {', '.join(ENGINES)}")
    return text.strip()


def parse_percentiles(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(":") if v.strip())
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"{text!r}: expected percentiles in (0, 100] separated by ':'")
    return values


# option -> (parser, default); bare flags parse as "" (true for booleans)
OPTIONS = {
    "rw": (parse_rw, "read"),
    "rwmixread": (parse_int(0, 100), 50),
    "bs": (parse_size, 4096),
    "bsrange": (parse_bsrange, (None, None)),  # per direction: sizes from LOW to HIGH
    "bssplit": (parse_bssplit, (None, None)),  # per direction: sizes by share
    "size": (parse_size, None),
    "offset": (parse_size, 0),
    "offset_increment": (parse_size, 0),  # job copy k starts at offset + k * offset_increment
    "filename": (str.strip, None),  # one file, or a:b:c, shared by the job's copies
    "directory": (str.strip, None),
    "nrfiles": (parse_int(1, 1 << 20), 1),  # files per job copy (io/files.py)
    "filesize": (parse_size_range, None),  # each file's size (LOW-HIGH: drawn per file); default size / nrfiles
    "filename_format": (str.strip, "$jobname.$jobnum.$filenum"),
    "file_service_type": (parse_file_service, ("roundrobin", (1,))),
    "openfiles": (parse_int(0), 0),  # at most this many files open at once (0: nrfiles)
    "numjobs": (parse_int(1, 4096), 1),  # fio's own limit (REAL_MAX_JOBS): copies are threads and buffers
    "direct": (parse_bool, False),
    "invalidate": (parse_bool, True),
    "runtime": (parse_seconds, None),
    "time_based": (parse_bool, False),
    "ramp_time": (parse_seconds, 0.0),
    "loops": (parse_int(1), 1),
    "fsync": (parse_int(0), 0),
    "io_size": (parse_size, 0),  # bytes a loop transfers, passing over the region again as needed (0: size)
    "number_ios": (parse_int(0), 0),  # stop after this many I/Os, if nothing ends the job before (0: no limit)
    "fdatasync": (parse_int(0), 0),  # as fsync, with fdatasync (psync; MPI-IO and HDF5 have one sync)
    "unlink": (parse_bool, False),  # remove the job's files when the run ends
    "percentile_list": (parse_percentiles, DEFAULT_PERCENTILES),
    "group_reporting": (parse_bool, False),
    "ioengine": (parse_engine, "psync"),
    # queue depth (libaio, io_uring; the synchronous engines run one I/O at a time, as fio's)
    "iodepth": (parse_int(1, 65536), 1),
    "iodepth_batch_submit": (parse_int(0), 1),  # commit every N staged I/Os (0: iodepth)
    "iodepth_batch_complete_min": (parse_int(0), 1),  # reap at least N at a time (at least 1)
    "iodepth_batch_complete_max": (parse_int(0), 0),  # and at most N (0: as many as the minimum)
    "iodepth_low": (parse_int(0), 0),  # reap until no more than N are in flight (0: iodepth)
    "name": (str.strip, ""),  # the job's name in reports (default: its section's)
    "description": (str.strip, ""),
    # order: a stonewall job starts when every earlier one is done (and opens a reporting group),
    # new_group opens one without waiting, wait_for=NAME waits for that earlier job
    "stonewall": (parse_bool, False),
    "new_group": (parse_bool, False),
    "wait_for": (str.strip, ""),
    "startdelay": (parse_time_range, (0.0, 0.0)),
    "exitall": (parse_bool, False),  # on any job: a job that finishes stops others (io/exits.py)
    "exit_what": (parse_choice("group", "all", "stonewall"), "group"),  # which: its group, all, its level
    # offsets
    "norandommap": (parse_bool, False),
    "randrepeat": (parse_bool, True),  # the same offsets on every run (0: a new seed each run)
    "randseed": (parse_int(0), 0x89),  # fio's default seed
    "random_distribution": (parse_distribution, ("random", ())),
    # rates, per job copy: bytes/s and IOPS for reads,writes
    "rate": (parse_pair(parse_size), (0, 0)),
    "rate_iops": (parse_pair(parse_int(0)), (0, 0)),
    "rate_process": (parse_choice("linear", "poisson"), "linear"),
    # verify: a checksummed header in every block written, checked when read (io/verify.py)
    "verify": (parse_choice("none", "crc32c", "md5", aliases={"0": "none", "crc32c-intel": "crc32c"}), "none"),
    "do_verify": (parse_bool, True),  # a write job reads back and checks what it wrote
    # files
    "end_fsync": (parse_bool, False),  # fsync the file when the job's I/O is done
    "fallocate": (parse_choice("none", "posix", "keep", "native", "truncate", aliases={"0": "none", "1": "posix"}),
                  "posix"),  # how a laid-out file is allocated before it is filled
    # logs (fio's format): PREFIX_bw.N.log, PREFIX_lat/_clat/_slat.N.log, PREFIX_iops.N.log
    "write_bw_log": (str.strip, None),  # a bare flag: the job's name as the prefix
    "write_lat_log": (str.strip, None),
    "write_iops_log": (str.strip, None),
    "log_avg_msec": (parse_int(0), 0),  # one averaged row per window and direction (0: a row per I/O)
    "log_offset": (parse_bool, False),  # add each I/O's offset (rows per I/O)
    "per_job_logs": (parse_bool, True),  # 0: one file per prefix, without the job number
    # ours, for the engines fio does not have
    "collective": (parse_bool, False),  # mpiio / hdf5: the collective _all forms
    "hdf5_chunk": (parse_size, 0),  # hdf5: chunk size of the byte dataset; 0 = contiguous
}
# fio's other spellings
ALIASES = {"readwrite": "rw", "blocksize": "bs", "rwmixwrite": "rwmixread", "io_limit": "io_size",
           "iodepth_batch": "iodepth_batch_submit", "iodepth_batch_complete": "iodepth_batch_complete_min",
           "buffered": "direct"}
# aliases that mean the opposite: rwmixwrite=30 is rwmixread=70, buffered=0 is direct=1
COMPLEMENTS = {"rwmixwrite": lambda v: 100 - v, "buffered": lambda v: not v}
# set by other options, never by name: rw=randread:8's N; the sizes and shares an I/O's size is drawn
# from, per direction, and the largest (bs is the smallest: offsets are aligned to it, as fio's)
DERIVED = {"rw_every": 0, "block_sizes": None, "bs_max": 0}
# Options that tune fio's own workings and cannot change what is measured here, with why.
IGNORED = {
    "thread": "hpc-train iobench always runs a rank's jobs as threads",
    "gtod_reduce": "timing calls are cheap here; every I/O is timed",
    "clocksource": "latencies are taken with CLOCK_MONOTONIC",
    "create_on_open": "files are created when they are laid out, before the jobs start (fio's default)",
}
MAX_INCLUDE_DEPTH = 16
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Job:
    """One job section with its effective options (globals then its own)."""

    name: str
    options: dict  # parsed values, every option present
    raw: dict  # the job section's own option strings, as fio echoes them in "job options"
    line: int
    source: str
    groupid: int = 0  # fio's reporting group: a new one at each stonewall or new_group
    section: str = ""  # the [section] that defined it (what --section selects)
    level: int = 0  # when it starts: after every job of a lower level is done (stonewall, wait_for)
    index: int = 0  # its place in the file (fio's job number, from 0)


@dataclass
class JobFile:
    path: str
    global_raw: dict = field(default_factory=dict)  # every [global] option string ("global options")
    jobs: list = field(default_factory=list)
    ignored: list = field(default_factory=list)  # "file:line: option 'X' ...: ignored" notes

    def select(self, sections: list[str]) -> None:
        """Keep the jobs of these sections (fio's --section); JobFileError naming one that is not there."""
        found = [job.section for job in self.jobs]
        for wanted in sections:
            if wanted not in found:
                raise JobFileError(f"{self.path}: no job section [{wanted}] (sections: {', '.join(found)})")
        self.jobs = [job for job in self.jobs if job.section in sections]


def _parse_value(source: str, number: int, key: str, value: str):
    name = ALIASES.get(key, key)
    if name not in OPTIONS:
        known = sorted([*OPTIONS, *ALIASES, *IGNORED])
        close = difflib.get_close_matches(key, known, n=1)
        raise JobFileError(f"{source}:{number}: option '{key}' is not supported by hpc-train iobench"
                           + (f" (did you mean '{close[0]}'?)" if close else "")
                           + f"; supported: {', '.join(known)}")
    try:
        parsed = OPTIONS[name][0](value)
        parsed = COMPLEMENTS[key](parsed) if key in COMPLEMENTS else parsed
        return parsed if isinstance(parsed, dict) else {name: parsed}
    except ValueError as exc:
        raise JobFileError(f"{source}:{number}: bad value for option '{key}': {exc}") from None


def _expand(line: str, source: str, number: int) -> str:
    """fio's ${VAR}: the environment variable's value; an unset one is an error, not an empty string."""
    def value(match):
        if match.group(1) not in os.environ:
            raise JobFileError(f"{source}:{number}: environment variable '{match.group(1)}' is not set")
        return os.environ[match.group(1)]

    return _VARIABLE.sub(value, line)


def _lines(text: str, source: str, depth: int = 0, first: int = 1):
    """(source, line number, line) of the job file, ${VAR} expanded and `include FILE` lines
    replaced by that file's (a relative name is taken from the including file's folder)."""
    for number, line in enumerate(text.splitlines(), start=first):
        line = _expand(line, source, number)
        words = line.split(None, 1)
        if not words or words[0] != "include":
            yield source, number, line
            continue
        if len(words) < 2:
            raise JobFileError(f"{source}:{number}: include needs a file name")
        if depth >= MAX_INCLUDE_DEPTH:
            raise JobFileError(f"{source}:{number}: includes nested more than {MAX_INCLUDE_DEPTH} deep (a loop?)")
        path = Path(words[1].strip())
        path = path if path.is_absolute() else Path(source).parent / path
        try:
            included = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise JobFileError(f"{source}:{number}: cannot include {path} ({exc})") from None
        yield from _lines(included, str(path), depth + 1)


def block_sizes(options: dict) -> tuple:
    """Per direction (reads, writes): the block sizes an I/O's size is drawn from and their shares:
    bssplit's, bsrange's (LOW, 2 x LOW, ... HIGH, evenly), or bs alone."""
    out = []
    for direction in (0, 1):
        split, size_range = options["bssplit"][direction], options["bsrange"][direction]
        if split:
            out.append((tuple(size for size, _ in split), tuple(share / 100 for _, share in split)))
        elif size_range:
            sizes = tuple(range(size_range[0], size_range[1] + 1, size_range[0]))
            out.append((sizes, (1 / len(sizes),) * len(sizes)))
        else:
            out.append(((options["bs"],), (1.0,)))
    return tuple(out)


def parse(text: str, source: str = "<job file>", first_line: int = 1) -> JobFile:
    """Parse a job file's text; every mistake names source, line and option."""
    result = JobFile(source)
    order = {"group": 0, "level": 0}  # the reporting group and start level of the jobs being defined
    global_values: dict = {}
    section, section_line, values, raw = None, 0, {}, {}

    def finish():
        if section is None or section == "global":
            return
        source = section_source
        merged = {key: default for key, (_, default) in OPTIONS.items()} | DERIVED
        merged.update(global_values)
        merged.update(values)
        if merged["size"] is None and merged["filesize"] is None:
            raise JobFileError(f"{source}:{section_line}: job '{section}' has no size (set size=, e.g. size=1g, "
                               "or filesize=)")
        if merged["bssplit"] != (None, None) and merged["bsrange"] != (None, None):
            raise JobFileError(f"{source}:{section_line}: job '{section}': set bssplit= or bsrange=, not both")
        merged["block_sizes"] = block_sizes(merged)
        every = [size for sizes, _ in merged["block_sizes"] for size in sizes]
        merged["bs"], merged["bs_max"] = min(every), max(every)
        smallest = merged["size"] // merged["nrfiles"] if merged["filesize"] is None else \
            merged["filesize"][0] - merged["offset"] - (merged["numjobs"] - 1) * merged["offset_increment"]
        if merged["bs"] <= 0 or smallest < merged["bs_max"]:
            what = f"filesize less the last copy's offset ({smallest})" if merged["filesize"] else \
                f"size ({smallest})" if merged["nrfiles"] == 1 else f"size / nrfiles ({smallest})"
            raise JobFileError(f"{source}:{section_line}: job '{section}': {what} must be at least "
                               f"the largest block size ({merged['bs_max']}), and block sizes positive")
        on_fd = [name for name, engine in ENGINES.items() if engine.on_fd]
        if merged["direct"] and merged["ioengine"] not in on_fd:
            raise JobFileError(f"{source}:{section_line}: job '{section}': direct=1 works with ioengine="
                               f"{', '.join(on_fd)} only")
        several = merged["nrfiles"] > 1 if not merged["filename"] else len(split_names(merged["filename"])) > 1
        if several and merged["ioengine"] not in on_fd:
            raise JobFileError(f"{source}:{section_line}: job '{section}': several files per job (nrfiles=, "
                               f"filename=a:b) work with ioengine={', '.join(on_fd)} only")
        if merged["collective"] and merged["ioengine"] in on_fd:
            raise JobFileError(f"{source}:{section_line}: job '{section}': collective=1 needs ioengine=mpiio or hdf5")
        if merged["collective"] and not merged["filename"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': collective=1 needs filename= "
                               "(one file shared by the job's copies)")
        if merged["collective"] and (merged["rw"] in ("rw", "randrw") or merged["time_based"]):
            raise JobFileError(f"{source}:{section_line}: job '{section}': collective=1 needs the same calls on every "
                               "rank: one direction (not rw/randrw) and no time_based")
        if merged["bs_max"] != merged["bs"] and merged["rw"].startswith("rand") and merged["rw_every"] > 1:
            raise JobFileError(f"{source}:{section_line}: job '{section}': rw={merged['rw']}:N is not supported "
                               "with several block sizes (bssplit, bsrange)")
        if merged["direct"] and any(size % 512 for size in every):
            raise JobFileError(f"{source}:{section_line}: job '{section}': direct=1 needs every block size a "
                               f"multiple of 512, got {', '.join(map(str, sorted(set(every))))}")
        if 0 < merged["io_size"] < merged["bs"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': io_size ({merged['io_size']}) must be at "
                               f"least bs ({merged['bs']})")
        if merged["fsync"] and merged["fdatasync"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': set fsync= or fdatasync=, not both")
        if merged["time_based"] and not merged["runtime"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': time_based needs runtime=")
        if merged["verify"] != "none" and (merged["rw"] in ("rw", "randrw") or merged["collective"]
                                           or merged["bs"] < 48):
            raise JobFileError(f"{source}:{section_line}: job '{section}': verify= works on a write job (checked "
                               "as it reads back) or a read job (checking a file written with verify), without "
                               "collective=1, with bs of at least 48 (its header)")
        if merged["collective"] and not merged["randrepeat"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': collective=1 needs the same offsets on "
                               "every rank: randrepeat=0 would draw different ones")
        earlier = result.jobs
        if earlier and (merged["stonewall"] or merged["new_group"]):
            order["group"] += 1
        if earlier and merged["stonewall"]:
            order["level"] = max(job.level for job in earlier) + 1
        level = order["level"]
        if merged["wait_for"]:
            waited = [job.level for job in earlier if job.name == merged["wait_for"]]
            if not waited:
                names = ", ".join(job.name for job in earlier) or "none"
                raise JobFileError(f"{source}:{section_line}: job '{section}': wait_for={merged['wait_for']}: no "
                                   f"earlier job has that name (earlier: {names})")
            level = max(level, max(waited) + 1)
        result.jobs.append(Job(merged["name"] or section, merged, dict(raw), section_line, source,
                               groupid=order["group"], section=section, level=level, index=len(earlier)))

    section_source = source
    for line_source, number, line in _lines(text, source, first=first_line):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]") or len(stripped) < 3:
                raise JobFileError(f"{line_source}:{number}: malformed section header {stripped!r}")
            finish()
            section, section_line, values, raw = stripped[1:-1].strip(), number, {}, {}
            section_source = line_source
            continue
        if section is None:
            raise JobFileError(f"{line_source}:{number}: option outside any section: {stripped!r}")
        key, sep, value = stripped.partition("=")
        key, value = key.strip(), value.strip() if sep else ""
        if key in IGNORED:
            result.ignored.append(f"{line_source}:{number}: option '{key}' ignored: {IGNORED[key]}")
            continue
        target = global_values if section == "global" else values
        target.update(_parse_value(line_source, number, key, value))
        if sep:  # fio echoes options given a value, not bare flags
            (result.global_raw if section == "global" else raw)[key] = value
    finish()
    if not result.jobs:
        raise JobFileError(f"{source}: no job sections (only [global] or nothing)")
    return result


def load(path) -> JobFile:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise JobFileError(f"{path}: cannot read job file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise JobFileError(f"{path}: not a text job file") from None
    return parse(text, str(path))


COMMAND_LINE = "<command line>"


def from_command_line(words: list[str]) -> JobFile:
    """Jobs given as fio takes them on its command line: options before the first --name=NAME
    are global, each --name=NAME starts a job; errors name the option by its place (the Nth)."""
    lines = ["[global]"]  # line 0: what comes before the first option
    for word in words:
        key, sep, value = word.removeprefix("--").partition("=")
        if not word.startswith("--") or not key or (key == "name" and not value):
            raise JobFileError(f"{COMMAND_LINE}:{len(lines)}: {word!r}: job options are given as --option=value "
                               "(a job starts at --name=NAME)")
        lines.append(f"[{value}]" if key == "name" else f"{key}={value}" if sep else key)
    if not any(line.startswith("[") for line in lines[1:]):
        raise JobFileError(f"{COMMAND_LINE}: no job: start one with --name=NAME, then its options")
    result = parse("\n".join(lines), COMMAND_LINE, first_line=0)
    for job in result.jobs:  # fio echoes a command-line job's name among its options
        job.raw = {"name": job.section, **job.raw}
    return result
