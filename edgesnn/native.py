"""Where the package's small C kernels are compiled from and kept: one place for both.

``crossbar_readout`` (the profile's Monte Carlo readout) and ``neuron_kernel``
(privatize's and binarize's one-timestep neuron) are C compiled on first use
with the system compiler and flags for this CPU (``-march=native``). A build
is kept in a cache folder (``EDGESNN_CACHE_DIR``, else
``$XDG_CACHE_HOME/edgesnn``, else ``~/.cache/edgesnn``) under a name that
hashes everything the machine code depends on: the source and flags, the
compiler (resolved path, size, modification time: an upgraded compiler builds
again) and the CPU (architecture, vendor, model, instruction-set flags: code
built for one CPU must not run on another that shares the folder). A build is
copied in under a temporary name and renamed, so a process loading it sees the
whole file or none, and an interrupted copy leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import tempfile
from collections.abc import Callable


def compiler() -> str | None:
    """The C compiler: ``$CC`` where set (a name on PATH or a path), else ``cc``, ``gcc`` or ``clang``; None where none is found."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cpu_description() -> list[str]:
    """The first CPU's vendor, model name and flags lines of /proc/cpuinfo; empty where it cannot tell (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            first_cpu = info.read().split("\n\n")[0]
    except OSError:
        return []
    return [line for line in first_cpu.splitlines() if line.startswith(("vendor_id", "model name", "flags"))]


def cpu_flags() -> list[str]:
    """This CPU's feature flags as Linux lists them; empty where it cannot tell."""
    return next((line.split(":", 1)[1].split() for line in cpu_description() if line.startswith("flags")), [])


def cache_folder() -> str | None:
    """The folder compiled kernels are kept in, or None where there is no absolute one (no home folder)."""
    folder = os.environ.get("EDGESNN_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "edgesnn")
    return folder if os.path.isabs(folder) else None


def cached_path(name: str, compiler_path: str, *parts: str | bytes) -> str | None:
    """Where this machine's build of kernel ``name`` (``parts``: its source and flags) is kept, or None where no key can be formed."""
    try:
        resolved = os.path.realpath(compiler_path)
        compiler_stat = os.stat(resolved)
    except OSError:
        return None
    cpu = cpu_description()
    folder = cache_folder()
    if not cpu or folder is None:
        return None
    digest = hashlib.sha256()
    for part in (*parts, resolved, str(compiler_stat.st_size), str(compiler_stat.st_mtime_ns), platform.machine(), *cpu):
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\n")
    return os.path.join(folder, f"{name}-{digest.hexdigest()[:32]}.so")


def keep(built: str, cached: str) -> bool:
    """Copy the built library to ``cached`` atomically; False (and nothing left behind) where the folder cannot be written."""
    partial = None
    try:
        os.makedirs(os.path.dirname(cached), mode=0o700, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=os.path.dirname(cached), suffix=".so.partial")
        os.close(handle)
        shutil.copyfile(built, partial)
        os.replace(partial, cached)
        return True
    except OSError:
        if partial is not None and os.path.exists(partial):
            os.remove(partial)
        return False


def load(name: str, compiler_path: str, parts: tuple[str | bytes, ...], build: Callable[[str], bool]) -> ctypes.CDLL | None:
    """This machine's build of kernel ``name``: from the cache where one loads, else ``build(path)`` (True once it has
    written a shared library at ``path``, in a scratch folder), kept in the cache and loaded; None where it cannot be built."""
    cached = cached_path(name, compiler_path, *parts)
    if cached is not None and os.path.isfile(cached):
        try:
            return ctypes.CDLL(cached)
        except OSError:
            pass  # unreadable or foreign: build it again
    with tempfile.TemporaryDirectory(prefix=f"edgesnn-{name}-") as scratch:
        built = os.path.join(scratch, f"{name}.so")
        try:
            library = ctypes.CDLL(built) if build(built) else None
        except OSError:
            return None
        if library is not None and cached is not None:
            keep(built, cached)
        return library  # mapped: the scratch folder can go
