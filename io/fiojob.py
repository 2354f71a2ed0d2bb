"""fio job files: INI sections, fio's option names, units and bare flags.

`[global]` options apply to the jobs defined after it (fio's rule; a later
`[global]` adds to them). Unknown options and bad values raise JobFileError
naming the file, the line and the option, as fio does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import JobFileError
from ..units import parse_size

RW_MODES = {"read": "read", "write": "write", "randread": "randread", "randwrite": "randwrite",
            "rw": "rw", "readwrite": "rw", "randrw": "randrw"}
ENGINES = ("psync", "mpiio", "hdf5")
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
    "percentile_list": (parse_percentiles, DEFAULT_PERCENTILES),
    "group_reporting": (parse_bool, False),
    "ioengine": (parse_engine, "psync"),
    # ours, for the engines fio does not have
    "collective": (parse_bool, False),  # mpiio / hdf5: the collective _all forms
    "hdf5_chunk": (parse_size, 0),  # hdf5: chunk size of the byte dataset; 0 = contiguous
}
ALIASES = {"readwrite": "rw"}  # fio accepts both names


@dataclass
class Job:
    """One job section with its effective options (globals then its own)."""

    name: str
    options: dict  # parsed values, every option present
    raw: dict  # the job section's own option strings, as fio echoes them in "job options"
    line: int
    source: str
    groupid: int = 0


@dataclass
class JobFile:
    path: str
    global_raw: dict = field(default_factory=dict)  # every [global] option string ("global options")
    jobs: list = field(default_factory=list)


def _parse_value(source: str, number: int, key: str, value: str):
    key = ALIASES.get(key, key)
    if key not in OPTIONS:
        raise JobFileError(f"{source}:{number}: unknown option '{key}'")
    parser = OPTIONS[key][0]
    try:
        return parser(value)
    except ValueError as exc:
        raise JobFileError(f"{source}:{number}: bad value for option '{key}': {exc}") from None


def parse(text: str, source: str = "<job file>") -> JobFile:
    """Parse a job file's text; every mistake names source, line and option."""
    result = JobFile(source)
    global_values: dict = {}
    section, section_line, values, raw = None, 0, {}, {}

    def finish():
        if section is None or section == "global":
            return
        merged = {key: default for key, (_, default) in OPTIONS.items()}
        merged.update(global_values)
        merged.update(values)
        if merged["size"] is None:
            raise JobFileError(f"{source}:{section_line}: job '{section}' has no size (set size=, e.g. size=1g)")
        if merged["bs"] <= 0 or merged["size"] < merged["bs"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': size ({merged['size']}) must be at least "
                               f"bs ({merged['bs']}), and bs positive")
        if merged["direct"] and merged["ioengine"] != "psync":
            raise JobFileError(f"{source}:{section_line}: job '{section}': direct=1 works with ioengine=psync only")
        if merged["collective"] and merged["ioengine"] == "psync":
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
        if merged["time_based"] and not merged["runtime"]:
            raise JobFileError(f"{source}:{section_line}: job '{section}': time_based needs runtime=")
        result.jobs.append(Job(section, merged, dict(raw), section_line, source, groupid=0))

    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]") or len(stripped) < 3:
                raise JobFileError(f"{source}:{number}: malformed section header {stripped!r}")
            finish()
            section, section_line, values, raw = stripped[1:-1].strip(), number, {}, {}
            continue
        if section is None:
            raise JobFileError(f"{source}:{number}: option outside any section: {stripped!r}")
        key, sep, value = stripped.partition("=")
        key, value = key.strip(), value.strip() if sep else ""
        parsed = _parse_value(source, number, key, value)
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
