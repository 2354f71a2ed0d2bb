"""`auto`: choose an allreduce algorithm by message size and topology.

The table maps a topology key to size thresholds, e.g.
`{"1x2": [[65536, "mpi"], [null, "shm"]]}`: up to 64 KiB use `mpi`, above use
`shm`. Keys are "NODESxRANKS_PER_NODE" for exact shapes and "single-node" /
"multi-node" as fallbacks, each with "-oversubscribed" appended when a node runs
more ranks than it has cores (spinning shared-memory paths then lose to MPI).
The shipped table was measured on the development machine; `hpc-train bench
allreduce --tune` measures the machine at hand and writes a table that takes
precedence (HPC_TRAIN_TUNING names another file).

Every rank must choose alike, or two ranks run different algorithms in one call and
wait for each other forever: at `init()` every rank takes rank 0's tables (its home's
tuned file, its HPC_TRAIN_TUNING), and the oversubscription in the key is agreed when the
topology is built (any host oversubscribed counts for all).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from importlib import resources
from pathlib import Path

from .. import runtime, settings
from .algorithms import ALLREDUCE, for_topology

log = logging.getLogger("hpc_train.comm")

TUNING_VARIABLE = settings.VARIABLES["tuning"].name
USER_TABLE = Path.home() / ".config" / "hpc_train" / "allreduce_tuning.json"
HOST_ALGORITHMS = tuple(ALLREDUCE)  # a table may name any registered algorithm


def _oversubscribed(topology) -> str:
    """'-oversubscribed' when some host runs more ranks than it has cores."""
    return "-oversubscribed" if topology.oversubscribed else ""


def topology_key(topology) -> str:
    """'NODESxRANKS_PER_NODE', e.g. '1x2', '16x8', '1x4-oversubscribed'; 'mixed' for uneven nodes."""
    if not topology.uniform:
        return "mixed" + _oversubscribed(topology)
    return f"{topology.num_nodes}x{topology.node_sizes[0]}{_oversubscribed(topology)}"


def fallback_key(topology) -> str:
    return ("single-node" if topology.num_nodes == 1 else "multi-node") + _oversubscribed(topology)


def validate_table(tables: dict, source: str) -> dict:
    """Check a table's shape and algorithm names; a bad file is named, not half-used."""
    if not isinstance(tables, dict):
        raise ValueError(f"{source}: 'tables' must be an object of topology -> rules")
    for key, rules in tables.items():
        if not isinstance(rules, list) or not rules:
            raise ValueError(f"{source}: tables[{key!r}] must be a non-empty list of [max_bytes, algorithm]")
        for rule in rules:
            if (not isinstance(rule, list) or len(rule) != 2 or rule[1] not in ALLREDUCE
                    or not (rule[0] is None or isinstance(rule[0], int))):
                raise ValueError(
                    f"{source}: tables[{key!r}] rule {rule!r}: expected [max_bytes or null, "
                    f"one of {tuple(ALLREDUCE)}]"
                )
        if rules[-1][0] is not None:
            raise ValueError(f"{source}: tables[{key!r}] must end with a [null, algorithm] rule")
    return tables


def read_table(path: Path | str) -> dict:
    """A tuning file's tables; ValueError naming the file (and line) when it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected an object with 'tables', got {type(doc).__name__}")
    return validate_table(doc.get("tables"), str(path))


def read_tables() -> dict:
    """This process's view: the shipped table, overlaid by the user's tuned table, overlaid by $HPC_TRAIN_TUNING."""
    shipped = resources.files("hpc_train").joinpath("tuning/allreduce.json")
    tables = dict(validate_table(json.loads(shipped.read_text())["tables"], str(shipped)))
    for path in (USER_TABLE, settings.current().tuning):
        if path and Path(path).is_file():
            tables.update(read_table(path))
    return tables


_agreed: dict | None = None


@functools.cache
def active_tables() -> dict:
    """The tables every rank agreed on at init() (rank 0's), or this process's before init."""
    return _agreed if _agreed is not None else read_tables()


def agree(comm) -> None:
    """Every rank takes rank 0's tables (collective); a bad file of rank 0's is an error on every
    rank, a rank whose own files say otherwise is told so once."""
    global _agreed
    try:
        mine, problem = read_tables(), None
    except (OSError, ValueError) as exc:
        mine, problem = None, str(exc)
    chosen, problem = comm.bcast((mine, problem), root=0)
    if problem is not None:
        raise ValueError(f"allreduce tuning table of rank 0: {problem}")
    if mine != chosen:
        log.warning("allreduce tuning: this rank's tables (%s, %s=%s) differ from rank 0's; using rank 0's",
                    USER_TABLE, TUNING_VARIABLE, settings.current().tuning)
    _agreed = chosen
    forget_choices()


runtime.at_init(agree)


_choices: dict = {}
_on_change: list = []  # callbacks of caches derived from our choices


def on_change(callback) -> None:
    """Call `callback()` whenever the table changes (plans built on old choices must go)."""
    _on_change.append(callback)


def choose(nbytes: int, topology) -> str:
    """The algorithm for an allreduce of nbytes on this topology (host memory); memoized."""
    key = (id(topology), nbytes)
    algorithm = _choices.get(key)
    if algorithm is None:
        algorithm = _choices[key] = _choose(nbytes, topology)
    return algorithm


def forget_choices() -> None:
    """After the table changed: drop memoized choices and re-read the table files."""
    _choices.clear()
    active_tables.cache_clear()
    for callback in _on_change:
        callback()


def _choose(nbytes: int, topology) -> str:
    tables = active_tables()
    rules = tables.get(topology_key(topology)) or tables[fallback_key(topology)]
    algorithm = next(algo for max_bytes, algo in rules if max_bytes is None or nbytes <= max_bytes)
    return for_topology(algorithm, topology.num_nodes)


def save_table(path: Path | str, key: str, rules: list, provenance: dict) -> Path:
    """Merge `rules` for topology `key` into the JSON table at path (written atomically)."""
    path = Path(path)
    doc = {"version": 1, "tables": {}}
    if path.is_file():
        doc = json.loads(path.read_text())
    doc.setdefault("tables", {})[key] = rules
    doc.setdefault("provenance", {})[key] = provenance
    validate_table(doc["tables"], str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    forget_choices()
    return path
