"""Small C modules shipped as source and compiled on first use (no compiler needed at install).

Built once into a cache directory, named by a hash of the sources, the compiler,
its flags, the platform and the Python ABI. A build is written under a name of
its own (host and process) and linked into place, never replacing a library
another process, perhaps on another node sharing the home directory, has loaded.
Where no compiler works (or HPC_TRAIN_NO_NATIVE=1), callers fall back to NumPy
and the job says so once in the log. The kernels' host build uses the same cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import socket
import subprocess
import sysconfig
from importlib import resources
from pathlib import Path

from . import settings

log = logging.getLogger("hpc_train")
CACHE_VARIABLE = settings.VARIABLES["cache"].name
DISABLE_VARIABLE = settings.VARIABLES["no_native"].name


class NativeUnavailable(RuntimeError):
    """The C module could not be built or loaded (the reason is the message)."""


def disabled() -> bool:
    return settings.current().no_native


def cache_dir() -> Path:
    return Path(settings.current().cache or Path.home() / ".cache" / "hpc_train") / "native"


def _source(package: str, source: str):
    return resources.files(package).joinpath(source)


def compiler(variable: str, names: tuple[str, ...]) -> str:
    """$variable, or the first of `names` on PATH; NativeUnavailable naming them otherwise."""
    found = os.environ.get(variable) or next(filter(None, map(shutil.which, names)), None)
    if found is None:
        raise NativeUnavailable(f"no compiler ({', '.join(names)} or ${variable}) on PATH")
    return found


def cached_path(stem: str, sources: bytes, command: list[str], suffix: str) -> Path:
    """Where the build of `sources` by `command` (compiler, resolved, and flags) lives for this platform."""
    key = b"\0".join([sources, os.path.realpath(command[0]).encode(), *(a.encode() for a in command[1:]),
                      platform.platform().encode(), suffix.encode()])
    return cache_dir() / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}{suffix}"


def cached_build(stem: str, sources: bytes, command: list[str], inputs: list[str], suffix: str) -> Path:
    """`command + inputs + ['-o', file]` run once into the cache (`cached_path`); the cached file."""
    target = cached_path(stem, sources, command, suffix)
    if target.exists():
        return target
    partial = target.with_name(f"{target.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    full = [*command, *inputs, "-o", str(partial)]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise NativeUnavailable(f"{' '.join(full)} failed:\n{result.stderr.strip()}")
        with contextlib.suppress(FileExistsError):  # another process finished first: the same library
            os.link(partial, target)  # a complete file or none, and never over one in use
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeUnavailable(f"{' '.join(full)}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return target


def _c_command() -> list[str]:
    return [compiler("CC", ("cc", "gcc")), "-O3", "-shared", "-fPIC", "-std=c11"]


def library_path(package: str, source: str, module: str) -> Path:
    """Where the compiled module for this source lives (built or not)."""
    return cached_path(module, _source(package, source).read_bytes(), _c_command(),
                       importlib.machinery.EXTENSION_SUFFIXES[0])


def build(package: str, source: str, module: str) -> Path:
    """Compile package/source into the cache unless it is there already."""
    with resources.as_file(_source(package, source)) as path:
        return cached_build(module, path.read_bytes(), _c_command(),
                            ["-I", sysconfig.get_paths()["include"], str(path)],
                            importlib.machinery.EXTENSION_SUFFIXES[0])


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
