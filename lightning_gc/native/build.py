"""Building ``kernel.c`` with the system's C compiler, once per machine, and loading it.

Where Python's headers are present, ``binding.c`` is compiled into the same library, which is then also a
Python extension module: its ``checked_centralize`` checks every gradient and calls the kernel in one C
call (see the binding's header for why). ctypes loads the same file for ``lgc_centralize`` itself, the entry
point the route uses after checking gradients in Python (without headers, the only one).

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
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

SOURCE = Path(__file__).with_name("kernel.c")
BINDING = Path(__file__).with_name("binding.c")
BINDING_MODULE = "_lightning_gc_native"
"""The extension module's name (its ``PyInit_`` function)."""
ABI_VERSION = 2
"""Must equal ``LGC_ABI_VERSION`` in the source."""
ENV_SWITCH = "LIGHTNING_GC_NATIVE"
"""Set to ``0`` to never use the kernel (the eager route runs everywhere)."""
ENV_BINDING = "LIGHTNING_GC_NATIVE_BINDING"
"""Set to ``0`` to build the kernel without its Python binding (gradients checked in Python, called through ctypes)."""
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
    binding: bool = False
    """Whether the library is also the Python extension that checks gradients in C (``binding.c``)."""


class Kernel:
    """The loaded library's entry points, typed.

    ``checked_centralize`` is the binding's entry point (see ``binding.c``), ``None`` where the library was
    built without Python's headers.
    """

    def __init__(self, library: ctypes.CDLL, path: Path, binding: ModuleType | None = None) -> None:
        self.path = path
        self.checked_centralize: Callable[..., tuple[float, float, int] | None] | None = (
            binding.checked_centralize if binding is not None else None
        )
        self.same_signature: Callable[[list[Any], tuple[Any, ...]], bool] | None = (
            binding.same_signature if binding is not None else None
        )
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


def python_include() -> Path | None:
    """The directory holding ``Python.h`` for this interpreter, ``None`` where its headers are not installed."""
    include = Path(sysconfig.get_paths()["include"])
    return include if (include / "Python.h").is_file() else None


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
        if loaded.checked_centralize is not None:
            return NativeStatus(True, "compiled and loaded, gradients checked in C", loaded.path, binding=True)
        why = f"{ENV_BINDING}=0" if _binding_switched_off() else "no Python.h for this interpreter"
        return NativeStatus(True, f"compiled and loaded, gradients checked in Python ({why})", loaded.path)
    return NativeStatus(False, loaded)


@functools.lru_cache(maxsize=1)
def _load() -> Kernel | str:
    """The kernel, or the reason it is unavailable; built at most once per process."""
    command = compiler()
    if command is None:
        return _unavailable("no C compiler found (set CC to one)")
    try:
        include = None if _binding_switched_off() else python_include()
        path = _built_library(command, include)
        library = ctypes.CDLL(str(path))
        if library.lgc_abi_version() != ABI_VERSION:
            return _unavailable(f"{path} has ABI {library.lgc_abi_version()}, expected {ABI_VERSION}")
        return Kernel(library, path, _import_binding(path) if include is not None else None)
    except (OSError, ImportError, subprocess.SubprocessError) as error:
        return _unavailable(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1") == "0"  # read on every call: tests and benchmarks flip it


def _binding_switched_off() -> bool:
    return os.environ.get(ENV_BINDING, "1") == "0"


def _unavailable(reason: str) -> str:
    log.info("lightning-gc: fused CPU kernel unavailable, using the eager route (%s)", reason)
    return reason


def _built_library(command: list[str], include: Path | None = None) -> Path:
    """The cached library for this compiler, machine and (with ``include``) Python, compiled now if missing."""
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = [SOURCE] if include is None else [SOURCE, BINDING]
    # the binding is built for this interpreter's ABI: its headers and extension suffix are part of the name
    python = f"{include}{sysconfig.get_config_var('EXT_SUFFIX')}" if include is not None else ""
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in sources), repr(command).encode(), repr((FLAGS, OPTIONAL_FLAGS)).encode(),
                 version.encode(), platform.machine().encode(), _cpu_identity().encode(), python.encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    path = cache_dir() / f"gc_kernel-{key.hexdigest()[:16]}.so"
    if not path.exists():
        _compile(command, path, sources, [f"-I{include}"] if include is not None else [])
    return path


def _import_binding(path: Path) -> ModuleType:
    """The library at ``path`` imported as the extension module :data:`BINDING_MODULE`."""
    loader = importlib.machinery.ExtensionFileLoader(BINDING_MODULE, str(path))
    spec = importlib.util.spec_from_file_location(BINDING_MODULE, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _compile(command: list[str], path: Path, sources: list[Path] | None = None, extra: list[str] | None = None) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the kernel cache {path.parent} ({error.strerror}); set {ENV_CACHE}") from error
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        for optional in OPTIONAL_FLAGS:
            result = subprocess.run(
                [*command, *FLAGS, *optional, *(extra or []), "-o", temporary, *map(str, sources or [SOURCE])],
                capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
            )  # fmt: skip
            if result.returncode == 0:
                os.replace(temporary, path)  # atomic: a concurrent process sees no file or a whole one
                return
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        first_error = next((line for line in lines if "error" in line), lines[-1])
        names = " and ".join(s.name for s in sources or [SOURCE])
        raise OSError(f"{command[0]} failed to compile {names}: {first_error.strip()}")
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
