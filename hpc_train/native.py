"""Small C modules shipped as source and compiled on first use (no compiler needed at install).

Built once into a cache directory (a home directory that every node of a cluster may share
over NFS), named by a hash of the sources, the compiler, its flags, the platform and the
Python ABI. One process per cache builds, under a lock made with link() (atomic and exclusive
also over NFS, where flock is not); the others wait for it. A build is written under a name of
its own (host, process, random) and linked into place with its SHA-256 beside it, never
replacing a library another process has loaded; a cached library whose digest does not match
(truncated, half-copied) is removed and built again. Where the cache cannot be written, a
private directory on this host's temporary file system serves instead, with one warning.
Where no compiler works (or HPC_TRAIN_NO_NATIVE=1), callers fall back to NumPy and the job
says so once in the log. The kernels' host build uses the same cache.
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
import secrets
import shutil
import socket
import stat
import subprocess
import sysconfig
import tempfile
import time
from importlib import resources
from pathlib import Path

from . import settings

log = logging.getLogger("hpc_train")
CACHE_VARIABLE = settings.VARIABLES["cache"].name
DISABLE_VARIABLE = settings.VARIABLES["no_native"].name
COMPILE_TIMEOUT_S = 120
LOCK_STALE_S = 2 * COMPILE_TIMEOUT_S + 60  # a lock this old was left by a builder that died
POLL_S = 0.05


class NativeUnavailable(RuntimeError):
    """The C module could not be built or loaded (the reason is the message)."""


def disabled() -> bool:
    return settings.current().no_native


def cache_dir() -> Path:
    """The configured cache (HPC_TRAIN_CACHE, else ~/.cache/hpc_train), writable or not."""
    return Path(settings.current().cache or Path.home() / ".cache" / "hpc_train") / "native"


def private_dir() -> Path:
    """This user's own cache on this host's temporary file system: 0700, owned by us, no symlink."""
    path = Path(tempfile.gettempdir()) / f"hpc_train-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise NativeUnavailable(f"{path} is not a private directory of this user (owner {info.st_uid}, "
                                f"mode {stat.filemode(info.st_mode)})")
    (path / "native").mkdir(exist_ok=True)
    return path / "native"


@functools.cache
def writable_dir(configured: Path) -> Path:
    """`configured` if files can be created in it, else private_dir() (warned about once)."""
    try:
        configured.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=configured, prefix=".probe-"):
            return configured
    except OSError as exc:
        try:
            fallback = private_dir()
        except (OSError, NativeUnavailable) as private_exc:
            raise NativeUnavailable(f"{configured}: {exc}; {private_exc}") from None
        log.warning("native build cache %s cannot be written (%s); building into %s", configured, exc, fallback)
        return fallback


def _source(package: str, source: str):
    return resources.files(package).joinpath(source)


def compiler(variable: str, names: tuple[str, ...]) -> str:
    """$variable, or the first of `names` on PATH; NativeUnavailable naming them otherwise."""
    found = os.environ.get(variable) or next(filter(None, map(shutil.which, names)), None)
    if found is None:
        raise NativeUnavailable(f"no compiler ({', '.join(names)} or ${variable}) on PATH")
    return found


def cache_name(stem: str, sources: bytes, command: list[str], suffix: str) -> str:
    """The file name of the build of `sources` by `command` (compiler, resolved, and flags) on this platform."""
    key = b"\0".join([sources, os.path.realpath(command[0]).encode(), *(a.encode() for a in command[1:]),
                      platform.platform().encode(), suffix.encode()])
    return f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}{suffix}"


def _digest_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def intact(library: Path) -> bool:
    """Whether `library` is there whole: its bytes match the digest written when it was built."""
    try:
        return _digest_file(library).read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return False


def _unique(path: Path, what: str) -> Path:
    return path.with_name(f"{path.name}.{what}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")


def _publish(partial: Path, target: Path) -> None:
    """Link a finished file into place: complete or absent, never over a file in use."""
    try:
        os.link(partial, target)
    except FileExistsError:  # NFS: a retried link whose first reply was lost says so, yet it succeeded
        if not os.path.samefile(partial, target):
            raise


def _try_lock(lock: Path, mine: Path) -> bool:
    try:
        os.link(mine, lock)
    except FileExistsError:
        return mine.stat().st_nlink == 2  # NFS: our link went through, its reply was lost
    return True


def _break_if_stale(lock: Path) -> None:
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > LOCK_STALE_S:
            log.warning("native build: removing %s, left %.0f s ago by %s", lock,
                        time.time() - lock.stat().st_mtime, lock.read_text().strip())
            lock.unlink()


def _compile(full: list[str], target: Path) -> None:
    """Run the compiler into a file of our own; publish the digest, then the library."""
    partial, digest = _unique(target, "tmp"), _unique(target, "sha256.tmp")
    try:
        result = subprocess.run([*full, str(partial)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise NativeUnavailable(f"{' '.join(full)} failed:\n{result.stderr.strip()}")
        digest.write_text(hashlib.sha256(partial.read_bytes()).hexdigest() + "\n")
        for stale in (target, _digest_file(target)):  # a corrupt earlier build: no reader can trust it
            stale.unlink(missing_ok=True)
        _publish(digest, _digest_file(target))
        _publish(partial, target)
    finally:
        for leftover in (partial, digest):
            with contextlib.suppress(OSError):
                leftover.unlink()


def cached_build(stem: str, sources: bytes, command: list[str], inputs: list[str], suffix: str) -> Path:
    """`command + inputs + ['-o', file]` run once into the cache; the cached file.

    A library already built (and intact) in the configured cache is used even where that cache is
    read-only; otherwise one process builds into the first writable of the cache and
    private_dir() while the others wait for the lock or for the library to appear.
    """
    name = cache_name(stem, sources, command, suffix)
    if intact(cache_dir() / name):
        return cache_dir() / name
    full = [*command, *inputs, "-o"]
    try:
        target = writable_dir(cache_dir()) / name
        lock = target.with_name(target.name + ".lock")
        mine = _unique(lock, "mine")
        mine.write_text(f"host {socket.gethostname()} pid {os.getpid()}\n")
        try:
            deadline = time.monotonic() + LOCK_STALE_S + COMPILE_TIMEOUT_S
            while not intact(target):
                if _try_lock(lock, mine):
                    try:
                        if not intact(target):
                            if target.exists():
                                log.warning("native build: %s does not match its digest; building it again", target)
                            _compile(full, target)
                    finally:
                        lock.unlink(missing_ok=True)
                    break
                _break_if_stale(lock)
                if time.monotonic() > deadline:
                    raise NativeUnavailable(f"waited {LOCK_STALE_S + COMPILE_TIMEOUT_S} s for {lock}")
                time.sleep(POLL_S)
        finally:
            mine.unlink(missing_ok=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeUnavailable(f"{' '.join(full)}: {exc}") from None
    return target


def _c_command() -> list[str]:
    return [compiler("CC", ("cc", "gcc")), "-O3", "-shared", "-fPIC", "-std=c11"]


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
