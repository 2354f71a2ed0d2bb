"""Job files: TOML, validated into typed sections before any MPI work starts.

Each section of a job file is a frozen dataclass below; a field's type, default, choices and
range are declared where the field is, and the choices come from the module that owns them
(models from `nn`, optimizers and strategies from `optim`, modes from `ps`). Unknown keys,
wrong types, values out of range and missing required keys raise JobFileError naming the
file and the dotted key, with a suggestion for near-miss spellings. Every rank parses the
same file, so every rank fails the same way. Sections read as attributes (`job.train.epochs`)
and, like the dicts they replace, by key (`job["train"]["epochs"]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import data, nn, preemption, ps
from ..errors import JobFileError
from ..optim import factory, sharded
from ..optim.distributed import COMPRESSIONS
from . import tensorboard_log

REQUIRED = object()  # a field default meaning "the job file must give it" (also used by study files)
SEED_MAX = 2**32 - 1  # numpy and torch both take seeds in [0, 2^32)


def key(default=REQUIRED, *, choices: tuple = (), minimum: float | None = None, above: float | None = None,
        maximum: float | None = None, below: float | None = None, each: type | None = None,
        items: tuple[int, int | None] = (0, None), doc: str = ""):
    """A job-file key: its default (lists are copied), allowed values, inclusive `minimum`/`maximum`,
    exclusive `above`/`below`, and what it means. For an array, `each` is its elements' type (the
    bounds then hold for every element) and `items` the (fewest, most) elements it may have."""
    meta = {"choices": tuple(choices), "minimum": minimum, "above": above, "maximum": maximum, "below": below,
            "each": each, "items": items, "doc": doc}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Section(Mapping):
    """A job-file section: frozen fields, readable by key as well."""

    def __getitem__(self, name: str):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


@dataclass(frozen=True)
class ModelSection(Section):
    name: str = key(choices=(*nn.MODELS, "torch"), doc="which model of nn.MODELS, or 'torch': model.factory's")
    widths: list = key([3072, 1024, 512, 10], each=int, minimum=1, items=(2, None),
                       doc="mlp: layer widths, input first, classes last")
    activation: str = key("relu", choices=tuple(nn.ACTIVATIONS), doc="mlp: between linear layers")
    dropout: float = key(0.0, minimum=0.0, maximum=0.99, doc="mlp: share of activations zeroed in training")
    channels: list = key([32, 64, 128], each=int, minimum=1, items=(1, None), doc="cnn: channels of the conv stages")
    hidden: int = key(256, minimum=1, doc="cnn: width of the hidden linear layer")
    batchnorm: bool = key(False, doc="cnn: batch normalization after each conv (statistics of the rank's batch)")
    sync_batchnorm: bool = key(False, doc="cnn, torch: statistics over every rank's batch")
    seed: int = key(0, minimum=0, maximum=SEED_MAX, doc="initial parameters (the same on every rank)")
    factory: str = key("", doc="torch: \"package.module:function\" returning a torch.nn.Module")
    kwargs: dict = key({}, doc="torch: keyword arguments of model.factory")
    loss: str = key("cross_entropy", doc="torch: one of hpc_train.torch.trainable.LOSSES")


@dataclass(frozen=True)
class DataSection(Section):
    name: str = key("synthetic", choices=data.DATASETS, doc="synthetic: made in memory; hdf5: data.path")
    path: str = key("", doc="hdf5: the training file")
    val_path: str = key("", doc="hdf5: the validation file")
    collective: bool = key(True, doc="hdf5: collective MPI-IO reads")
    prefetch: int = key(2, minimum=1, doc="hdf5: batches read ahead (the queue between reader and trainer)")
    train_samples: int = key(8000, minimum=1, doc="synthetic: training samples (every rank builds them all)")
    val_samples: int = key(2000, minimum=1, doc="synthetic: validation samples")
    shape: list = key([32, 32, 3], each=int, minimum=1, items=(1, None), doc="synthetic: a sample's shape")
    classes: int = key(10, minimum=1, maximum=2**24, doc="synthetic: labels 0..classes-1")
    noise: float = key(1.0, minimum=0.0, doc="synthetic: spread of samples around their class")
    seed: int = key(1, minimum=0, maximum=SEED_MAX, doc="synthetic: the data drawn")


@dataclass(frozen=True)
class OptimizerSection(Section):
    name: str = key("sgd", choices=factory.OPTIMIZERS, doc="the update rule")
    lr: float = key(0.05, minimum=0.0, doc="learning rate (before the schedule)")
    momentum: float = key(0.9, minimum=0.0, maximum=1.0, doc="sgd")
    nesterov: bool = key(False, doc="sgd")
    weight_decay: float = key(0.0, minimum=0.0, doc="L2 (sgd, adam) or decoupled (adamw)")
    betas: list = key([0.9, 0.999], each=float, minimum=0.0, below=1.0, items=(2, 2), doc="adam, adamw")
    eps: float = key(1e-8, above=0.0, doc="adam, adamw: added to the denominator")


@dataclass(frozen=True)
class ScheduleSection(Section):
    name: str = key("constant", choices=factory.SCHEDULES, doc="learning rate over the steps")
    warmup_steps: int = key(0, minimum=0, doc="linear warm-up from 0")
    min_lr: float = key(0.0, minimum=0.0, doc="cosine: the floor")
    step_size: int = key(1000, minimum=1, doc="step: steps between decays")
    gamma: float = key(0.1, above=0.0, doc="step: factor of each decay")
    scale_with_batch: bool = key(False, doc="linear scaling rule")
    reference_batch: int = key(256, minimum=1, doc="scale_with_batch: the batch lr is given for")


@dataclass(frozen=True)
class TrainSection(Section):
    epochs: int = key(1, minimum=1, doc="passes over the training set")
    max_steps: int = key(0, minimum=0, doc="steps of the whole run; 0: epochs * steps per epoch")
    steps_per_epoch: int = key(0, minimum=0, doc="steps of each epoch; 0: the whole training set")
    global_batch: int = key(128, minimum=1, doc="samples a step over all ranks (split evenly)")
    seed: int = key(0, minimum=0, maximum=SEED_MAX, doc="shuffling of the training set")
    drop_last: bool = key(False, doc="leave out a last short batch")


@dataclass(frozen=True)
class DistributedSection(Section):
    bucket_mb: float = key(25.0, above=0.0, doc="gradients reduced together (MiB)")
    compression: str = key("none", choices=("none", *COMPRESSIONS), doc="gradients on the wire")
    backward_passes_per_step: int = key(1, minimum=1, doc="accumulation: backward passes per update")
    stall_warning_s: float = key(60.0, above=0.0, doc="a collective waiting this long is reported")
    stall_abort_s: float = key(600.0, above=0.0, doc="and this long ends the job (> stall_warning_s)")
    zero_stage: int = key(0, choices=(0, *sharded.STAGES), doc="0: data parallel; 1-3: ZeRO")
    node_shared: bool = key(True, doc="plain data parallel keeps one copy of parameters and state per node")


@dataclass(frozen=True)
class PsSection(Section):
    """Parameter server over MPI windows instead of allreduce (optimizer: sgd)."""

    mode: str = key("", choices=("", *ps.MODES), doc="'' turns it off")
    staleness: int = key(2, minimum=0, doc="ssp: the bound s")
    tau: int = key(4, minimum=1, doc="easgd: steps between exchanges with the center")
    alpha: float = key(0.5, above=0.0, maximum=1.0, doc="easgd: moving rate")
    servers: int = key(0, minimum=0, doc="ranks hosting parameters: 0 = every rank, K = ranks 0..K-1")
    slow_rank: int = key(-1, minimum=-1, doc="straggler injection: this rank sleeps slow_by_s every step (-1: none)")
    slow_by_s: float = key(0.0, minimum=0.0, doc="straggler injection: seconds")


@dataclass(frozen=True)
class CheckpointSection(Section):
    every_steps: int = key(0, minimum=0, doc="0: no checkpoints")
    keep_last: int = key(3, minimum=0, doc="checkpoints kept (0: all)")
    directory: str = key("results/checkpoints", doc="where checkpoints are written")
    resume: str = key("", doc="'' | 'auto' (newest complete checkpoint, if any) | a checkpoint path")
    signals: list = key(list(preemption.DEFAULT_SIGNALS), each=str,
                        doc="signals that stop the run at the next step, after a checkpoint (exit code 75); "
                            "[]: they keep their default action")


@dataclass(frozen=True)
class LogSection(Section):
    metrics: str = key("results/metrics.jsonl", doc="JSON lines of steps, epochs and the summary")
    every_steps: int = key(10, minimum=1, doc="a metrics record every N steps")
    progress: bool = key(True, doc="a progress bar on rank 0")
    timeline: str = key("", doc="a Chrome trace of every rank ('': none)")
    tensorboard: str = key("", doc="a folder for TensorBoard event files (extra hpc_train[tensorboard]); '': none")


@dataclass(frozen=True)
class ElasticSection(Section):
    """`hpc-train train --elastic`: restarts after a lost host (see hpc_train.elastic)."""

    min_ranks: int = key(1, minimum=1, doc="never restart on fewer ranks")
    max_restarts: int = key(3, minimum=0, doc="restarts before giving up")
    probe_port: int = key(22, minimum=1, maximum=65535, doc="TCP port a host's liveness is probed on")
    probe_timeout_s: float = key(3.0, above=0.0, doc="a host silent this long is taken as lost")


@dataclass(frozen=True)
class Job(Section):
    model: ModelSection
    data: DataSection
    optimizer: OptimizerSection
    schedule: ScheduleSection
    train: TrainSection
    distributed: DistributedSection
    ps: PsSection
    checkpoint: CheckpointSection
    log: LogSection
    elastic: ElasticSection

    def to_dict(self) -> dict:
        """Plain dicts and lists, for JSON (checkpoints record the job they ran)."""
        return dataclasses.asdict(self)

    def replace(self, section: str, **values) -> Job:
        """A copy with some keys of one section changed (not validated again: callers pass valid values)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(self[section], **values)})


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Job)[f.name] for f in dataclasses.fields(Job)}
_KINDS = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}


def reference() -> str:
    """Every job-file key as a Markdown table: type, default, valid values and meaning (`hpc-train keys`,
    docs/job-keys.md), made from the declarations above so that it cannot drift from them."""
    lines = ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            kind = type_name(hints[f.name]) + (f" of {type_name(meta['each'])}" if meta["each"] else "")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"| `{name}.{f.name}` | {kind} | `{'(required)' if default is REQUIRED else repr(default)}` | "
                         f"{_valid(meta)} | {meta['doc'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _valid(meta: dict) -> str:
    """A key's choices and bounds in words: "one of ...", ">= 1", "(0, 1]", "2 elements, each >= 0"."""
    if meta["choices"]:
        return "one of " + ", ".join(f"`{c!r}`" for c in meta["choices"])
    low = ("[", meta["minimum"]) if meta["minimum"] is not None else ("(", meta["above"])
    high = (meta["maximum"], "]") if meta["maximum"] is not None else (meta["below"], ")")
    if low[1] is not None and high[0] is not None:
        bound = f"{low[0]}{low[1]}, {high[0]}{high[1]}"
    elif low[1] is not None:
        bound = f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    elif high[0] is not None:
        bound = f"{'<=' if high[1] == ']' else '<'} {high[0]}"
    else:
        bound = "finite" if meta["each"] is float else ""
    if meta["each"] is None:
        return bound
    fewest, most = meta["items"]
    count = f"{fewest}" if fewest == most else f"at least {fewest}" if most is None else f"{fewest} to {most}"
    count += " element" if count.endswith(" 1") or count == "1" else " elements"
    return ", ".join(part for part in (count if fewest else "", f"each {bound}" if bound else "") if part)


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"int": "integer", "float": "number", "str": "string", "bool": "boolean",
                        "list": "array", "dict": "table"}[k.__name__] for k in kinds)


def parse_override(text: str) -> tuple[str, object]:
    """'train.epochs=3' -> ('train.epochs', 3); values are TOML, bare words are strings."""
    name, sep, raw = text.partition("=")
    if not sep or "." not in name:
        raise JobFileError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return name.strip(), value


def read_toml(path: Path, what: str = "job file") -> dict:
    """A TOML file's tables; JobFileError naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise JobFileError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"{path}: not valid TOML: {exc}") from None


def load(path: str | Path, overrides: list[str] = ()) -> Job:
    """The validated job: every section and key filled in, overrides applied."""
    path = Path(path)
    raw = read_toml(path)
    for text in overrides:
        dotted, value = parse_override(text)
        section, _, name = dotted.partition(".")
        raw.setdefault(section, {})[name] = value
    return validate(raw, str(path))


def _checked(source: str, dotted: str, value, kind, meta: dict):
    """The value of one key, or JobFileError saying what is wrong with it."""
    value = _in_range(source, dotted, value, kind, meta)
    if meta["each"] is not None:
        fewest, most = meta["items"]
        if len(value) < fewest or most is not None and len(value) > most:
            count = f"{fewest}" if fewest == most else f"at least {fewest}" if most is None else f"{fewest}-{most}"
            raise JobFileError(f"{source}: '{dotted}' must have {count} elements, got {len(value)}: {value!r}")
        for i, item in enumerate(value):
            _in_range(source, f"{dotted}[{i}]", item, meta["each"], meta)
    return value


def _in_range(source: str, dotted: str, value, kind, meta: dict):
    """`value` if it is of `kind` and within the key's choices and bounds (numbers only)."""
    kinds = _KINDS[kind]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise JobFileError(f"{source}: '{dotted}' must be {type_name(kinds)}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise JobFileError(f"{source}: '{dotted}' = {value!r}: expected one of {meta['choices']}")
    if not isinstance(value, int | float):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise JobFileError(f"{source}: '{dotted}' must be a finite number, got {value!r}")
    if meta["above"] is not None and not value > meta["above"]:
        raise JobFileError(f"{source}: '{dotted}' must be positive, got {value}" if meta["above"] == 0 else
                           f"{source}: '{dotted}' must be > {meta['above']}, got {value}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        what = "positive" if meta["minimum"] == 1 and kind is int else f">= {meta['minimum']}"
        raise JobFileError(f"{source}: '{dotted}' must be {what}, got {value}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise JobFileError(f"{source}: '{dotted}' must be <= {meta['maximum']}, got {value}")
    if meta["below"] is not None and not value < meta["below"]:
        raise JobFileError(f"{source}: '{dotted}' must be < {meta['below']}, got {value}")
    return value


def _section(source: str, name: str, cls: type, given: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for unknown in given.keys() - fields.keys():
        raise JobFileError(f"{source}: unknown key '{name}.{unknown}'{suggest(unknown, fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key_name, f in fields.items():
        dotted = f"{name}.{key_name}"
        if key_name in given:
            values[key_name] = _checked(source, dotted, given[key_name], hints[key_name], f.metadata)
        elif f.default is REQUIRED:
            raise JobFileError(f"{source}: missing required key '{dotted}'")
    return cls(**values)


def validate(raw: dict, source: str) -> Job:
    for name, values in raw.items():
        if name not in SECTIONS:
            raise JobFileError(f"{source}: unknown section [{name}]{suggest(name, SECTIONS)}")
        if not isinstance(values, dict):
            raise JobFileError(f"{source}: [{name}] must be a table")
    if "model" not in raw:
        raise JobFileError(f"{source}: missing [model] section (model.name is required)")
    job = Job(**{name: _section(source, name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()})
    _check_combinations(job, source)
    return job


def _check_combinations(job: Job, source: str) -> None:
    """Keys that are valid alone but not together."""
    if job.data.name == "hdf5":
        for name in ("path", "val_path"):
            if not job.data[name]:
                raise JobFileError(f"{source}: 'data.{name}' is required when data.name = 'hdf5'")
    if job.model.name == "torch":
        _check_torch_model(job, source)
    if job.log.tensorboard and (problem := tensorboard_log.available()):
        raise JobFileError(f"{source}: 'log.tensorboard' needs the tensorboard package ({problem}): "
                           f"pip install 'hpc_train[tensorboard]'")
    for name in job.checkpoint.signals:
        try:
            preemption.signal_number(str(name))
        except ValueError as exc:
            raise JobFileError(f"{source}: 'checkpoint.signals': {exc}") from None
    dist = job.distributed
    if dist.stall_abort_s <= dist.stall_warning_s:
        raise JobFileError(f"{source}: 'distributed.stall_abort_s' = {dist.stall_abort_s} must exceed "
                           f"'distributed.stall_warning_s' = {dist.stall_warning_s} (warn first, then abort)")
    if dist.zero_stage >= 2 and dist.compression != "none":
        raise JobFileError(f"{source}: 'distributed.compression' = {dist.compression!r} needs zero_stage 0 or 1 "
                           f"(stage {dist.zero_stage} reduce-scatters float32 gradients)")
    if not job.ps.mode:
        return
    if job.optimizer.name != "sgd":
        raise JobFileError(f"{source}: 'ps.mode' = {job.ps.mode!r} updates with SGD on the servers: "
                           f"'optimizer.name' must be 'sgd', got {job.optimizer.name!r}")
    for dotted, off in (("distributed.zero_stage", 0), ("checkpoint.every_steps", 0), ("checkpoint.resume", "")):
        section, name = dotted.split(".")
        if job[section][name] != off:
            raise JobFileError(f"{source}: '{dotted}' cannot be used with 'ps.mode' = {job.ps.mode!r}")


def _check_torch_model(job: Job, source: str) -> None:
    """A torch model's keys, and what hpc_train.torch does not do for torch models."""
    if not job.model.factory:
        raise JobFileError(f"{source}: 'model.factory' is required when model.name = 'torch' "
                           f"(\"package.module:function\", e.g. \"hpc_train.torch.models:resnet20\")")
    for dotted, off in (("distributed.zero_stage", 0), ("ps.mode", "")):
        section, name = dotted.split(".")
        if job[section][name] != off:
            raise JobFileError(f"{source}: '{dotted}' = {job[section][name]!r} is not available for torch models "
                               f"(model.name = 'torch'): data parallel only, replicas or node-shared")
    try:
        from ..torch.trainable import LOSSES
    except ImportError as error:
        raise JobFileError(f"{source}: model.name = 'torch' needs PyTorch ({error}): "
                           f"pip install 'hpc_train[torch]'") from None
    if job.model.loss not in LOSSES:
        raise JobFileError(f"{source}: 'model.loss' = {job.model.loss!r}: expected one of {tuple(LOSSES)}"
                           f"{suggest(job.model.loss, LOSSES)}")
