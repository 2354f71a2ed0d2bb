"""The native build cache as a cluster uses it: shared by processes and nodes (a home directory
over NFS), sometimes read-only, sometimes damaged. "Nodes" are processes with host names of their
own (a UTS namespace); read-only is a read-only bind mount in a mount namespace of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpc_train import native

from .conftest import clean_environment, python_cmd

BUILD = "from hpc_train import native; print(native.build('hpc_train.optim', 'fused.c', '_fused'))"
LOAD = ("from hpc_train import native; "
        "print('native' if native.load('hpc_train.optim', 'fused.c', '_fused') else 'numpy')")


def test_key_covers_compiler_and_flags():
    base = native.cache_name("m", b"source", ["cc", "-O3"], ".so")
    assert native.cache_name("m", b"source", ["cc", "-O3"], ".so") == base
    assert native.cache_name("m", b"source", ["cc", "-O2"], ".so") != base
    assert native.cache_name("m", b"source", ["/bin/false", "-O3"], ".so") != base
    assert native.cache_name("m", b"source!", ["cc", "-O3"], ".so") != base


def isolated(*setup: str) -> list[str]:
    """A command prefix that runs what follows in new namespaces after the shell lines `setup`
    (a host name of its own, a read-only bind mount); skips the test where that is not allowed."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("namespaces need root and unshare")
    probe = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare refused here: {probe.stderr.strip()}")
    return ["unshare", "--uts", "--mount", "sh", "-c", " && ".join([*setup, 'exec "$@"']), "isolated"]


def counting_compiler(tmp_path: Path) -> Path:
    """A C compiler that logs each run (with its host) and takes a second, so that builders overlap."""
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\necho "$(hostname) $$" >> {tmp_path / "compiles"}\nsleep 1\nexec gcc "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_builders_on_two_nodes_sharing_the_cache_compile_once(tmp_path):
    cache = tmp_path / "home-cache"
    env = {**clean_environment(), native.CACHE_VARIABLE: str(cache), "CC": str(counting_compiler(tmp_path))}
    procs = [subprocess.Popen([*isolated(f"hostname node{k % 2}"), *python_cmd("-c", BUILD)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert len((tmp_path / "compiles").read_text().splitlines()) == 1  # the others waited for the lock
    library = Path(results[0][0].strip())
    assert sorted(f.name for f in (cache / "native").iterdir()) == [library.name, library.name + ".sha256"]
    assert native.intact(library)


def test_a_truncated_cached_library_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path))
    library = native.build("hpc_train.optim", "fused.c", "_fused")
    whole = library.read_bytes()
    library.write_bytes(whole[: len(whole) // 2])  # a copy cut short, a disk that filled up
    assert not native.intact(library)
    rebuilt = subprocess.run(python_cmd("-c", LOAD), env={**clean_environment(), native.CACHE_VARIABLE: str(tmp_path)},
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0 and rebuilt.stdout.strip() == "native", rebuilt.stderr
    assert "does not match its digest; building it again" in rebuilt.stderr
    assert native.intact(library) and len(library.read_bytes()) == len(whole)


def test_a_read_only_cache_is_used_where_it_holds_the_build_and_bypassed_where_not(tmp_path):
    shared, private = tmp_path / "read-only", tmp_path / "tmp"
    private.mkdir()
    env = {**clean_environment(), native.CACHE_VARIABLE: str(shared), "TMPDIR": str(private)}
    read_only = isolated(f"mount --bind {shared} {shared}", f"mount -o remount,bind,ro {shared}")
    shared.mkdir()
    empty = subprocess.run([*read_only, *python_cmd("-c", LOAD)], env=env, capture_output=True, text=True, timeout=120)
    assert empty.returncode == 0 and empty.stdout.strip() == "native", empty.stderr
    assert f"native build cache {shared / 'native'} cannot be written" in empty.stderr
    assert "Read-only file system" in empty.stderr and f"building into {private}" in empty.stderr
    assert not any(shared.rglob("*.so")) and any((private / f"hpc_train-{os.getuid()}" / "native").glob("*.so"))

    subprocess.run(python_cmd("-c", BUILD), env=env, check=True, capture_output=True, timeout=120)  # the admin's build
    prebuilt = subprocess.run([*read_only, *python_cmd("-c", LOAD)], env={**env, "TMPDIR": "/nonexistent"},
                              capture_output=True, text=True, timeout=120)
    assert prebuilt.returncode == 0 and prebuilt.stdout.strip() == "native", prebuilt.stderr
    assert "cannot be written" not in prebuilt.stderr


@pytest.mark.parametrize("squat", ["world-writable", "symlink"])
def test_with_no_cache_of_our_own_the_job_runs_on_numpy(tmp_path, squat):
    """The configured cache unusable, and the private directory taken by someone else in the shared
    temporary directory: no build lands where another user could swap it; NumPy, said once."""
    blocker, shared_tmp = tmp_path / "not-a-directory", tmp_path / "tmp"
    blocker.write_text("")
    taken = shared_tmp / f"hpc_train-{os.getuid()}"
    shared_tmp.mkdir()
    if squat == "symlink":
        taken.symlink_to(tmp_path)
    else:
        taken.mkdir()
        taken.chmod(0o777)
    env = {**clean_environment(), native.CACHE_VARIABLE: str(blocker), "TMPDIR": str(shared_tmp)}
    proc = subprocess.run(python_cmd("-c", LOAD), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "numpy", proc.stderr
    assert proc.stderr.count("native _fused unavailable") == 1 and "not-a-directory" in proc.stderr
    assert "is not a private directory of this user" in proc.stderr
