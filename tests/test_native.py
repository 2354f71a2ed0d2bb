"""The native build cache as a cluster uses it: shared by processes (and nodes), sometimes unwritable."""

from __future__ import annotations

import subprocess

import pytest

from hpc_train import native

from .conftest import clean_environment, python_cmd

BUILD = "from hpc_train import native; print(native.build('hpc_train.optim', 'fused.c', '_fused'))"


def test_key_covers_compiler_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path))
    base = native.cached_path("m", b"source", ["cc", "-O3"], ".so")
    assert native.cached_path("m", b"source", ["cc", "-O3"], ".so") == base
    assert native.cached_path("m", b"source", ["cc", "-O2"], ".so") != base
    assert native.cached_path("m", b"source", ["/bin/false", "-O3"], ".so") != base
    assert native.cached_path("m", b"source!", ["cc", "-O3"], ".so") != base


def test_concurrent_builders_leave_one_complete_library(tmp_path):
    env = {**clean_environment(), native.CACHE_VARIABLE: str(tmp_path)}
    procs = [subprocess.Popen(python_cmd("-c", BUILD), env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    built = sorted(f.name for f in (tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].startswith("_fused-")  # no partial file left behind
    loaded = subprocess.run(python_cmd("-c", f"{BUILD}; native.import_built(native.build('hpc_train.optim', "
                                       "'fused.c', '_fused'), '_fused')"), env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr


def test_an_unusable_cache_directory_means_the_numpy_path(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(native.CACHE_VARIABLE, str(blocker))
    with pytest.raises(native.NativeUnavailable, match="not-a-directory"):
        native.build("hpc_train.optim", "fused.c", "_fused")
    assert native.load.__wrapped__("hpc_train.optim", "fused.c", "_fused") is None  # load() without its cache
