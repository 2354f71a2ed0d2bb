"""Small C modules shipped as source and compiled on first use (no compiler needed at install).

Built once per machine into a cache directory, named by a hash of the source and
the Python ABI; an atomic rename makes concurrent builders harmless. Where no
compiler works (or HPC_TRAIN_NO_NATIVE=1), callers fall back to NumPy and the
job says so once in the log.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sysconfig
from importlib import resources
from pathlib import Path

log = logging.getLogger("hpc_train")
CACHE_VARIABLE = "HPC_TRAIN_CACHE"
DISABLE_VARIABLE = "HPC_TRAIN_NO_NATIVE"


class NativeUnavailable(RuntimeError):
    """The C module could not be built or loaded (the reason is the message)."""


def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE) == "1"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "hpc_train") / "native"


def _source(package: str, source: str):
    return resources.files(package).joinpath(source)


def library_path(package: str, source: str, module: str) -> Path:
    """Where the compiled module for this source, Python ABI and platform lives."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    tag = hashlib.sha256(_source(package, source).read_bytes() + suffix.encode()).hexdigest()[:16]
    return cache_dir() / f"{module}-{tag}{suffix}"


def build(package: str, source: str, module: str) -> Path:
    """Compile package/source into the cache unless it is there already."""
    target = library_path(package, source, module)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeUnavailable("no C compiler (cc, gcc or $CC) on PATH")
    with resources.as_file(_source(package, source)) as path:
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        command = [compiler, "-O3", "-shared", "-fPIC", "-std=c11", "-I", sysconfig.get_paths()["include"],
                   str(path), "-o", str(partial)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeUnavailable(f"compiling {path}: {exc}") from None
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise NativeUnavailable(f"compiling {path} failed:\n{result.stderr.strip()}")
    os.replace(partial, target)
    return target


def import_built(path: Path, module: str):
    """Import an extension module from a built file."""
    try:
        spec = importlib.util.spec_from_file_location(module, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    except (ImportError, OSError) as exc:
        raise NativeUnavailable(f"loading {path}: {exc}") from None
    return loaded


@functools.cache
def load(package: str, source: str, module: str):
    """Build (if needed) and import in this process; None, logged once, where that fails."""
    if disabled():
        return None
    try:
        return import_built(build(package, source, module), module)
    except NativeUnavailable as exc:
        log.warning("native %s unavailable (%s); using NumPy", module, exc)
        return None
