"""Job files: TOML, validated against a schema before any MPI work starts.

Every key has a type and a default (None: required when its section is used).
Unknown keys, wrong types and missing required keys raise JobFileError naming
the file and the dotted key, with a suggestion for near-miss spellings. Every
rank parses the same file, so every rank fails the same way.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from ..errors import JobFileError

REQUIRED = object()

# section -> key -> (type or tuple of types, default)
SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {
        "name": (str, REQUIRED),  # "mlp" | "cnn"
        "widths": (list, [3072, 1024, 512, 10]),
        "activation": (str, "relu"),
        "dropout": ((int, float), 0.0),
        "channels": (list, [32, 64, 128]),
        "hidden": (int, 256),
        "batchnorm": (bool, False),
        "sync_batchnorm": (bool, False),
        "seed": (int, 0),
    },
    "data": {
        "name": (str, "synthetic"),  # "synthetic" | "hdf5"
        "path": (str, ""),  # hdf5: the training file
        "val_path": (str, ""),  # hdf5: the validation file
        "collective": (bool, True),  # hdf5: collective MPI-IO reads
        "prefetch": (int, 2),  # hdf5: batches read ahead
        "train_samples": (int, 8000),
        "val_samples": (int, 2000),
        "shape": (list, [32, 32, 3]),
        "classes": (int, 10),
        "noise": ((int, float), 1.0),
        "seed": (int, 1),
    },
    "optimizer": {
        "name": (str, "sgd"),  # "sgd" | "adam" | "adamw"
        "lr": ((int, float), 0.05),
        "momentum": ((int, float), 0.9),
        "nesterov": (bool, False),
        "weight_decay": ((int, float), 0.0),
        "betas": (list, [0.9, 0.999]),
        "eps": ((int, float), 1e-8),
    },
    "schedule": {
        "name": (str, "constant"),  # "constant" | "cosine" | "step"
        "warmup_steps": (int, 0),
        "min_lr": ((int, float), 0.0),
        "step_size": (int, 1000),
        "gamma": ((int, float), 0.1),
        "scale_with_batch": (bool, False),  # linear scaling rule
        "reference_batch": (int, 256),
    },
    "train": {
        "epochs": (int, 1),
        "max_steps": (int, 0),  # steps of the whole run; 0: epochs * steps per epoch
        "steps_per_epoch": (int, 0),  # steps of each epoch; 0: the whole training set
        "global_batch": (int, 128),
        "seed": (int, 0),
        "drop_last": (bool, False),
    },
    "distributed": {
        "bucket_mb": ((int, float), 25.0),
        "compression": (str, "none"),  # "none" | "fp16" | "bf16"
        "backward_passes_per_step": (int, 1),
        "stall_warning_s": ((int, float), 60.0),
        "stall_abort_s": ((int, float), 600.0),
        "zero_stage": (int, 0),  # 0: data parallel; 1, 2, 3: ZeRO (state; + gradients; + parameters sharded)
        # data parallel without compression: one copy of parameters and state per node (NodeSharedOptimizer)
        "node_shared": (bool, True),
    },
    "ps": {  # parameter server over MPI windows instead of allreduce (optimizer: sgd)
        "mode": (str, ""),  # "" (off) | "sync" | "async" | "ssp" | "easgd" | "staleness_lr"
        "staleness": (int, 2),  # ssp: the bound s
        "tau": (int, 4),  # easgd: steps between exchanges with the center
        "alpha": ((int, float), 0.5),  # easgd: moving rate
        "servers": (int, 0),  # ranks hosting parameters: 0 = every rank, K = ranks 0..K-1
        "slow_rank": (int, -1),  # straggler injection: this rank sleeps slow_by_s every step
        "slow_by_s": ((int, float), 0.0),
    },
    "checkpoint": {
        "every_steps": (int, 0),  # 0: no checkpoints
        "keep_last": (int, 3),
        "directory": (str, "results/checkpoints"),
        "resume": (str, ""),  # "" | "auto" (newest complete checkpoint, if any) | a checkpoint path
    },
    "log": {
        "metrics": (str, "results/metrics.jsonl"),
        "every_steps": (int, 10),
        "progress": (bool, True),
        "timeline": (str, ""),
    },
}
CHOICES = {
    "model.name": ("mlp", "cnn"),
    "model.activation": ("relu", "gelu"),
    "data.name": ("synthetic", "hdf5"),
    "optimizer.name": ("sgd", "adam", "adamw"),
    "schedule.name": ("constant", "cosine", "step"),
    "distributed.compression": ("none", "fp16", "bf16"),
    "distributed.zero_stage": (0, 1, 2, 3),
    "ps.mode": ("", "sync", "async", "ssp", "easgd", "staleness_lr"),
}
NON_NEGATIVE = ("train.max_steps", "train.steps_per_epoch")
POSITIVE = ("data.train_samples", "data.val_samples", "data.classes", "train.epochs", "train.global_batch",
            "log.every_steps", "distributed.backward_passes_per_step")


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"int": "integer", "float": "number", "str": "string", "bool": "boolean",
                        "list": "array"}[k.__name__] for k in kinds)


def parse_override(text: str) -> tuple[str, object]:
    """'train.epochs=3' -> ('train.epochs', 3); values are TOML, bare words are strings."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise JobFileError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _check_ps(job: dict, source: str) -> None:
    ps = job["ps"]
    if ps["staleness"] < 0:
        raise JobFileError(f"{source}: 'ps.staleness' must be >= 0, got {ps['staleness']}")
    if ps["tau"] < 1 or not 0 < ps["alpha"] <= 1 or ps["servers"] < 0:
        raise JobFileError(f"{source}: [ps] needs tau >= 1, 0 < alpha <= 1 and servers >= 0, got tau = "
                           f"{ps['tau']}, alpha = {ps['alpha']}, servers = {ps['servers']}")
    if not ps["mode"]:
        return
    if job["optimizer"]["name"] != "sgd":
        raise JobFileError(f"{source}: 'ps.mode' = {ps['mode']!r} updates with SGD on the servers: "
                           f"'optimizer.name' must be 'sgd', got {job['optimizer']['name']!r}")
    for key, off in (("distributed.zero_stage", 0), ("checkpoint.every_steps", 0), ("checkpoint.resume", "")):
        section, name = key.split(".")
        if job[section][name] != off:
            raise JobFileError(f"{source}: '{key}' cannot be used with 'ps.mode' = {ps['mode']!r}")


def read_toml(path: Path, what: str = "job file") -> dict:
    """A TOML file's tables; JobFileError naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise JobFileError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"{path}: not valid TOML: {exc}") from None


def load(path: str | Path, overrides: list[str] = ()) -> dict:
    """The validated job: every section and key filled in, overrides applied."""
    path = Path(path)
    raw = read_toml(path)
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    return validate(raw, str(path))


def validate(raw: dict, source: str) -> dict:
    job: dict[str, dict] = {}
    for section, values in raw.items():
        if section not in SCHEMA:
            raise JobFileError(f"{source}: unknown section [{section}]{suggest(section, SCHEMA)}")
        if not isinstance(values, dict):
            raise JobFileError(f"{source}: [{section}] must be a table")
    if "model" not in raw:
        raise JobFileError(f"{source}: missing [model] section (model.name is required)")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        for key in given:
            if key not in keys:
                raise JobFileError(f"{source}: unknown key '{section}.{key}'{suggest(key, keys)}")
        job[section] = {}
        for key, (kind, default) in keys.items():
            dotted = f"{section}.{key}"
            if key not in given:
                if default is REQUIRED:
                    raise JobFileError(f"{source}: missing required key '{dotted}'")
                job[section][key] = default
                continue
            value = given[key]
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise JobFileError(f"{source}: '{dotted}' must be {type_name(kind)}, got {value!r}")
            if dotted in CHOICES and value not in CHOICES[dotted]:
                raise JobFileError(f"{source}: '{dotted}' = {value!r}: expected one of {CHOICES[dotted]}")
            if dotted in POSITIVE and value <= 0:
                raise JobFileError(f"{source}: '{dotted}' must be positive, got {value}")
            if dotted in NON_NEGATIVE and value < 0:
                raise JobFileError(f"{source}: '{dotted}' must be >= 0 (0: no limit), got {value}")
            job[section][key] = value
    if job["data"]["name"] == "hdf5":
        for key in ("path", "val_path"):
            if not job["data"][key]:
                raise JobFileError(f"{source}: 'data.{key}' is required when data.name = 'hdf5'")
    _check_ps(job, source)
    dist = job["distributed"]
    if dist["zero_stage"] >= 2 and dist["compression"] != "none":
        raise JobFileError(f"{source}: 'distributed.compression' = {dist['compression']!r} needs zero_stage 0 or 1 "
                           f"(stage {dist['zero_stage']} reduce-scatters float32 gradients)")
    return job
