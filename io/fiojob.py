"""fio job files: INI sections, fio's option names and aliases, units and bare flags,
`${VAR}` expansion and `include FILE` lines.

`[global]` options apply to the jobs defined after it (fio's rule; a later
`[global]` adds to them). An option we do not implement and a bad value raise JobFileError
naming the file, the line and the option (never ignored silently); options that only tune
fio's own workings (IGNORED) are accepted and reported as ignored.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import JobFileError
from ..units import parse_size
from .engines import ENGINES

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


def parse_rw(text: str) -> str:
    if text.strip() not in RW_MODES:
        raise ValueError(f"{text!r}: expected one of {', '.join(RW_MODES)}")
    return RW_MODES[text.strip()]


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
    "size": (parse_size, None),
    "offset": (parse_size, 0),
    "offset_increment": (parse_size, 0),  # job copy k starts at offset + k * offset_increment
    "filename": (str.strip, None),
    "directory": (str.strip, None),
    "numjobs": (parse_int(1), 1),
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
    # ours, for the engines fio does not have
    "collective": (parse_bool, False),  # mpiio / hdf5: the collective _all forms
    "hdf5_chunk": (parse_size, 0),  # hdf5: chunk size of the byte dataset; 0 = contiguous
}
# fio's other spellings
ALIASES = {"readwrite": "rw", "blocksize": "bs", "rwmixwrite": "rwmixread", "io_limit": "io_size",
           "iodepth_batch": "iodepth_batch_submit", "iodepth_batch_complete": "iodepth_batch_complete_min"}
COMPLEMENTS = {"rwmixwrite"}  # an alias whose value is the other share: rwmixwrite=30 is rwmixread=70
# Options that tune fio's own workings and cannot change what is measured here, with why.
IGNORED = {
    "thread": "hpc-train iobench always runs a rank's jobs as threads",
    "gtod_reduce": "timing calls are cheap here; every I/O is timed",
    "clocksource": "latencies are taken with CLOCK_MONOTONIC",
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
    groupid: int = 0
    section: str = ""  # the [section] that defined it (what --section selects)


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
        return 100 - parsed if key in COMPLEMENTS else parsed
    except ValueError as exc:
        raise JobFileError(f"{source}:{number}: bad value for option '{key}': {exc}") from None


def _expand(line: str, source: str, number: int) -> str:
    """fio's ${VAR}: the environment variable's value; an unset one is an error, not an empty string."""
    def value(match):
        if match.group(1) not in os.environ:
            raise JobFileError(f"{source}:{number}: environment variable '{match.group(1)}' is not set")
        return os.environ[match.group(1)]

    return _VARIABLE.sub(value, line)


def _lines(text: str, source: str, depth: int = 0):
    """(source, line number, line) of the job file, ${VAR} expanded and `include FILE` lines
    replaced by that file's (a relative name is taken from the including file's folder)."""
    for number, line in enumerate(text.splitlines(), start=1):
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


def parse(text: str, source: str = "<job file>") -> JobFile:
    """Parse a job file's text; every mistake names source, line and option."""
    result = JobFile(source)
    global_values: dict = {}
    section, section_line, values, raw = None, 0, {}, {}

    def finish():
        if section is None or section == "global":
            return
        source = section_source
        merged = {key: default for key, (_, default) in OPTIONS.items()}
        merged.update(global_values)
        merged.update(values)
        if merged["size"] is None:
            raise JobFileError(f"{source}:{section_line}: job '{section}' has no size (set size=, e.g. size=1g)")
        if merged["bs"] <= 0 or merged["size"] < merged["bs"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': size ({merged['size']}) must be at least "
                               f"bs ({merged['bs']}), and bs positive")
        on_fd = [name for name, engine in ENGINES.items() if engine.on_fd]
        if merged["direct"] and merged["ioengine"] not in on_fd:
            raise JobFileError(f"{source}:{section_line}: job '{section}': direct=1 works with ioengine="
                               f"{', '.join(on_fd)} only")
        if merged["collective"] and merged["ioengine"] in on_fd:
            raise JobFileError(f"{source}:{section_line}: job '{section}': collective=1 needs ioengine=mpiio or hdf5")
        if merged["collective"] and not merged["filename"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': collective=1 needs filename= "
                               "(one file shared by the job's copies)")
        if merged["collective"] and (merged["rw"] in ("rw", "randrw") or merged["time_based"]):
            raise JobFileError(f"{source}:{section_line}: job '{section}': collective=1 needs the same calls on every "
                               "rank: one direction (not rw/randrw) and no time_based")
        if merged["direct"] and merged["bs"] % 512:
            raise JobFileError(f"{source}:{section_line}: job '{section}': direct=1 needs bs a multiple of 512, "
                               f"got {merged['bs']}")
        if 0 < merged["io_size"] < merged["bs"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': io_size ({merged['io_size']}) must be at "
                               f"least bs ({merged['bs']})")
        if merged["fsync"] and merged["fdatasync"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': set fsync= or fdatasync=, not both")
        if merged["time_based"] and not merged["runtime"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': time_based needs runtime=")
        result.jobs.append(Job(merged["name"] or section, merged, dict(raw), section_line, source, groupid=0,
                               section=section))

    section_source = source
    for line_source, number, line in _lines(text, source):
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
        parsed = _parse_value(line_source, number, key, value)
        target = global_values if section == "global" else values
        target[ALIASES.get(key, key)] = parsed
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
