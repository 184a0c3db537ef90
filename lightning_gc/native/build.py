"""Building ``kernel.c`` with the system's C compiler, once per machine, and loading it with ctypes.

The library is cached under :func:`cache_dir`, named by a hash of everything that shapes the binary (the
source, the flags, the compiler's version, the CPU's identity: ``-march=native`` code must not run on
another CPU that shares a home directory). It is compiled to a temporary name and renamed into place, so
processes starting together (DDP ranks) never load a half-written file. Compiling takes a fraction of a
second; without a compiler the eager route runs instead, and :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("kernel.c")
ABI_VERSION = 2
"""Must equal ``LGC_ABI_VERSION`` in the source."""
ENV_SWITCH = "LIGHTNING_GC_NATIVE"
"""Set to ``0`` to never use the kernel (the eager route runs everywhere)."""
ENV_CACHE = "LIGHTNING_GC_CACHE_DIR"
"""Where compiled kernels are kept (default: ``$XDG_CACHE_HOME/lightning-gc`` or ``~/.cache/lightning-gc``)."""
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread")
OPTIONAL_FLAGS = (("-march=native", "-fopenmp"), ("-march=native",), ())
"""Tried in order until one compiles. ``-march=native``: the vector width of this CPU (measured on ResNet-50
shapes: 1.37x of the floor with x86-64's baseline SSE2, 1.03x with ``-march=native`` on an AVX-512 CPU). ``-fopenmp``: threads from the
OpenMP runtime PyTorch has loaded, instead of threads of its own (see ``run_shares`` in the source)."""
COMPILE_TIMEOUT_S = 120

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeStatus:
    """Whether the fused kernel is in use, and if not, why.

    Example:
        >>> from lightning_gc.native import status
        >>> isinstance(status().available, bool)
        True
    """

    available: bool
    reason: str
    library: Path | None = None


class Kernel:
    """The loaded library's entry points, typed."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.supports_float16 = bool(library.lgc_supports_float16())
        int64_array = ctypes.POINTER(ctypes.c_int64)
        self.centralize = library.lgc_centralize
        self.centralize.restype = ctypes.c_double
        self.centralize.argtypes = [
            ctypes.c_int64, int64_array, int64_array, int64_array, int64_array, int64_array,
            ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_double), ctypes.c_int64, ctypes.c_int64,
            ctypes.POINTER(ctypes.c_double),  # out: the gradients' squared norm before GC, or None
        ]  # fmt: skip


def cache_dir() -> Path:
    """The directory compiled kernels are kept in."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning-gc"


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, else the one Python was built with, else ``cc``; ``None`` if absent."""
    candidates = [os.environ.get("CC", ""), str(sysconfig.get_config_var("CC") or ""), "cc"]
    for candidate in candidates:
        command = shlex.split(candidate)
        if command and shutil.which(command[0]):
            return command
    return None


def kernel() -> Kernel | None:
    """The loaded kernel, or ``None`` when it is switched off or cannot be built (see :func:`status`)."""
    loaded = None if _switched_off() else _load()
    return loaded if isinstance(loaded, Kernel) else None


def status() -> NativeStatus:
    """Whether :func:`kernel` returns a kernel here, and why not if it does not."""
    if _switched_off():
        return NativeStatus(False, f"switched off by {ENV_SWITCH}=0")
    loaded = _load()
    if isinstance(loaded, Kernel):
        return NativeStatus(True, "compiled and loaded", loaded.path)
    return NativeStatus(False, loaded)


@functools.lru_cache(maxsize=1)
def _load() -> Kernel | str:
    """The kernel, or the reason it is unavailable; built at most once per process."""
    command = compiler()
    if command is None:
        return _unavailable("no C compiler found (set CC to one)")
    try:
        path = _built_library(command)
        library = ctypes.CDLL(str(path))
        if library.lgc_abi_version() != ABI_VERSION:
            return _unavailable(f"{path} has ABI {library.lgc_abi_version()}, expected {ABI_VERSION}")
        return Kernel(library, path)
    except (OSError, subprocess.SubprocessError) as error:
        return _unavailable(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1") == "0"  # read on every call: tests and benchmarks flip it


def _unavailable(reason: str) -> str:
    log.info("lightning-gc: fused CPU kernel unavailable, using the eager route (%s)", reason)
    return reason


def _built_library(command: list[str]) -> Path:
    """The cached library for this compiler and machine, compiled now if missing."""
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(command).encode(), repr((FLAGS, OPTIONAL_FLAGS)).encode(), version.encode(),
                 platform.machine().encode(), _cpu_identity().encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    path = cache_dir() / f"gc_kernel-{key.hexdigest()[:16]}.so"
    if not path.exists():
        _compile(command, path)
    return path


def _compile(command: list[str], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the kernel cache {path.parent} ({error.strerror}); set {ENV_CACHE}") from error
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        for optional in OPTIONAL_FLAGS:
            result = subprocess.run(
                [*command, *FLAGS, *optional, "-o", temporary, str(SOURCE)],
                capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
            )  # fmt: skip
            if result.returncode == 0:
                os.replace(temporary, path)  # atomic: a concurrent process sees no file or a whole one
                return
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        first_error = next((line for line in lines if "error" in line), lines[-1])
        raise OSError(f"{command[0]} failed to compile {SOURCE.name}: {first_error.strip()}")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))
