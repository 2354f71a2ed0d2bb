"""Job-file validation: every mistake named by file and key (serial)."""

from __future__ import annotations

import pytest

from hpc_train.train.config import JobFileError, load, parse_override


def write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    job = load(write(tmp_path, '[model]\nname = "mlp"\n'), ["train.epochs=3", "optimizer.name=adam",
                                                            "model.widths=[8, 4]"])
    assert job["train"]["epochs"] == 3 and job["optimizer"]["name"] == "adam"
    assert job["model"]["widths"] == [8, 4] and job["train"]["global_batch"] == 128


@pytest.mark.parametrize("text, message", [
    ('[model]\nname = "mlp"\n[train]\nepoch = 3\n',
     r"job.toml: unknown key 'train.epoch' \(did you mean 'epochs'\?\)"),
    ('[model]\nname = "mlp"\n[trian]\n', r"unknown section \[trian\] \(did you mean 'train'\?\)"),
    ('[train]\nepochs = 3\n', r"job.toml: missing \[model\] section"),
    ('[model]\nwidths = [1, 2]\n', r"missing required key 'model.name'"),
    ('[model]\nname = "resnet"\n', r"'model.name' = 'resnet': expected one of \('mlp', 'cnn', 'torch'\)"),
    ('[model]\nname = "mlp"\n[train]\nepochs = "3"\n', r"'train.epochs' must be integer, got '3'"),
    ('[model]\nname = "mlp"\n[train]\nepochs = true\n', r"'train.epochs' must be integer, got True"),
    ('[model]\nname = "mlp"\n[train]\nglobal_batch = 0\n', r"'train.global_batch' must be positive"),
    ('[model\nname = "mlp"\n', r"job.toml: not valid TOML"),
    ('[model]\nname = "mlp"\n[distributed]\nzero_stage = 4\n',
     r"'distributed.zero_stage' = 4: expected one of \(0, 1, 2, 3\)"),
    ('[model]\nname = "mlp"\n[distributed]\nzero_stage = 3\ncompression = "fp16"\n',
     r"'distributed.compression' = 'fp16' needs zero_stage 0 or 1"),
    ('[model]\nname = "mlp"\n[ps]\nmode = "hogwild"\n', r"'ps.mode' = 'hogwild': expected one of"),
    ('[model]\nname = "mlp"\n[ps]\nmode = "ssp"\nstaleness = -1\n', r"'ps.staleness' must be >= 0, got -1"),
    ('[model]\nname = "mlp"\n[ps]\nmode = "async"\n[optimizer]\nname = "adam"\n',
     r"'optimizer.name' must be 'sgd', got 'adam'"),
])
def test_errors_name_file_and_key(tmp_path, text, message):
    with pytest.raises(JobFileError, match=message):
        load(write(tmp_path, text))


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(JobFileError, match="nope.toml: job file not found"):
        load(tmp_path / "nope.toml")
    with pytest.raises(JobFileError, match="expected section.key=value"):
        parse_override("epochs=3")
    assert parse_override("log.metrics=out/m.jsonl") == ("log.metrics", "out/m.jsonl")


@pytest.mark.parametrize("name", ["demo.toml", "mlp.toml", "cnn.toml", "cnn_zero3.toml"])
def test_shipped_jobs_are_valid(name):
    from pathlib import Path

    job = load(Path(__file__).resolve().parent.parent / "jobs" / name)
    assert job["model"]["name"] in ("mlp", "cnn")


@pytest.mark.parametrize("text, message", [
    ("[distributed]\nstall_warning_s = 0\n", r"'distributed.stall_warning_s' must be positive, got 0"),
    ("[distributed]\nstall_abort_s = -1\n", r"'distributed.stall_abort_s' must be positive, got -1"),
    ("[distributed]\nstall_warning_s = 30\nstall_abort_s = 20\n",
     r"'distributed.stall_abort_s' = 20 must exceed 'distributed.stall_warning_s' = 30"),
    ("[distributed]\nbucket_mb = -5\n", r"'distributed.bucket_mb' must be positive, got -5"),
    ("[optimizer]\nlr = nan\n", r"'optimizer.lr' must be a finite number, got nan"),
    ("[optimizer]\nmomentum = 1.5\n", r"'optimizer.momentum' must be <= 1.0, got 1.5"),
    ("[train]\nmax_steps = -1\n", r"'train.max_steps' must be >= 0, got -1"),
    ("[data]\nprefetch = 0\n", r"'data.prefetch' must be positive, got 0"),
    ("widths = [3072, -5, 10]\n", r"'model.widths\[1\]' must be positive, got -5"),
    ("widths = [3072, \"x\", 10]\n", r"'model.widths\[1\]' must be integer, got 'x'"),
    ("widths = [3072]\n", r"'model.widths' must have at least 2 elements, got 1"),
    ("[data]\nshape = [32, 0, 3]\n", r"'data.shape\[1\]' must be positive, got 0"),
    ("[optimizer]\nbetas = [0.9, 1.0]\n", r"'optimizer.betas\[1\]' must be < 1.0, got 1.0"),
    ("[optimizer]\nbetas = [0.9]\n", r"'optimizer.betas' must have 2 elements, got 1"),
    ("[train]\nseed = -1\n", r"'train.seed' must be >= 0, got -1"),
    ("[data]\nseed = 4294967296\n", r"'data.seed' must be <= 4294967295, got 4294967296"),
    ("[checkpoint]\nsignals = [10]\n", r"'checkpoint.signals\[0\]' must be string, got 10"),
])
def test_values_out_of_range_are_named(tmp_path, text, message):
    with pytest.raises(JobFileError, match=message):
        load(write(tmp_path, '[model]\nname = "mlp"\n' + text))


def test_sections_are_typed_and_frozen(tmp_path):
    import dataclasses

    job = load(write(tmp_path, '[model]\nname = "cnn"\n[train]\nepochs = 2\n'))
    assert job.train.epochs == job["train"]["epochs"] == 2 and job.model.name == "cnn"
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.train.epochs = 3
    changed = job.replace("log", metrics="elsewhere.jsonl")
    assert changed.log.metrics == "elsewhere.jsonl" and job.log.metrics == "results/metrics.jsonl"
    assert changed.to_dict()["train"]["epochs"] == 2


def test_every_key_documented_with_its_range_in_docs():
    """docs/job-keys.md is `hpc-train keys` (made from the declarations): a key added or changed
    without regenerating the page fails here. Regenerate: `hpc-train keys` into the page's table."""
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "job-keys.md").read_text()
    table = page[page.index("| key |"):]
    keys = subprocess.run([sys.executable, "-m", "hpc_train", "keys"], capture_output=True, text=True, timeout=60)
    assert keys.returncode == 0, keys.stderr
    assert table == keys.stdout, "docs/job-keys.md is stale: regenerate its table with `hpc-train keys`"
    numbers = [line for line in table.splitlines()[2:] if "| integer |" in line or "| number |" in line]
    assert numbers and all(line.split("|")[4].strip() for line in numbers), "a numeric key without a range"
