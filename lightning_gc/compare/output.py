"""The output folder of a comparison: one comparison at a time, never mixes results, deletes only its own files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any

from lightning_gc.compare.project import ProjectError

MANIFEST = "comparison.json"
# What comparisons wrote into the folder (paths relative to it): the only things `--overwrite` removes.
WRITTEN = ".lightning-gc-written.json"
LOCK_FILE = ".lightning-gc-compare.lock"
# Set by wrappers such as `make demo` whose users cannot pass compare's flags: "make demo DEMO_ARGS={flag}".
AGAIN_VARIABLE = "LIGHTNING_GC_COMPARE_AGAIN"
# What may differ between the invocation that started a comparison and one resuming it: the number of
# seeds (more seeds add runs), what only the summary uses, and how the runs are spread over the machine.
_RESUMABLE = frozenset(
    {"seeds", "metric", "mode", "target", "chance", "lightning_gc", "jobs", "devices_per_run", "slurm"}
)
# Outputs of comparisons made before the WRITTEN list existed.
_LEGACY_OUTPUTS = ("summary.md", "summary.csv", "runs.csv", "curves.png", "sweep.csv", "sweep.png")


def again(flag: str) -> str:
    """How to pass ``flag`` to this comparison: "pass `--overwrite`", or the wrapper's own way
    (``LIGHTNING_GC_COMPARE_AGAIN``, e.g. "run `make demo DEMO_ARGS=--overwrite`").

    Example:
        >>> os.environ.pop(AGAIN_VARIABLE, None) and None
        >>> again("--resume")
        'pass `--resume`'
    """
    template = os.environ.get(AGAIN_VARIABLE)
    return f"run `{template.format(flag=flag)}`" if template else f"pass `{flag}`"


def _named(out: Path) -> str:
    """How messages name the output folder: as the option that gave it, unless a wrapper gave it."""
    return str(out) if os.environ.get(AGAIN_VARIABLE) else f"`--out` {out}"


def _or_another_out() -> str:
    return "" if os.environ.get(AGAIN_VARIABLE) else " or choose another `--out`"


class OutputFolder:
    """``--out``, locked for one comparison: an exclusive ``fcntl.flock`` on ``OUT/.lightning-gc-compare.lock``
    (released by the operating system if the holder dies), and the list of what comparisons wrote in it.

    Use :func:`prepare_output` to get one; :meth:`close` (or leaving the ``with`` block) releases the lock.
    """

    def __init__(self, path: Path, lock: IO[str]) -> None:
        self.path = path
        self._lock = lock

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock."""
        if not self._lock.closed:
            self._lock.close()  # closing the descriptor releases the flock

    def record(self, *paths: Path) -> None:
        """Note that the comparison writes ``paths`` (inside the folder), before writing them."""
        written = self.written()
        new = [p.absolute().relative_to(self.path).as_posix() for p in paths]
        if all(p in written for p in new):
            return
        written += [p for p in new if p not in written]
        tmp = self.path / f"{WRITTEN}.tmp"
        tmp.write_text(json.dumps(written, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path / WRITTEN)

    def written(self) -> list[str]:
        """What comparisons wrote here, relative to the folder."""
        try:
            entries = json.loads((self.path / WRITTEN).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _legacy_written(self.path)
        except ValueError as err:
            raise ProjectError(f"{self.path / WRITTEN} is damaged ({err}); remove the folder yourself") from err
        return [str(e) for e in entries]

    def remove_written(self) -> list[str]:
        """Remove what comparisons wrote here; return what is left (the entries nobody recorded), relative."""
        for entry in sorted(self.written(), key=lambda e: -e.count("/")):
            target = self.path / entry
            if ".." in Path(entry).parts or not target.absolute().is_relative_to(self.path):
                continue  # never outside the folder, whatever the list says
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            _prune_empty_parents(target.parent, self.path)
        (self.path / WRITTEN).unlink(missing_ok=True)
        own = {LOCK_FILE}
        return sorted(
            p.relative_to(self.path).as_posix()
            for p in self.path.rglob("*")
            if p.name not in own and (p.is_file() or p.is_symlink() or not any(p.iterdir()))
        )


def prepare_output(
    out: Path, settings: dict[str, Any], resume: bool = False, overwrite: bool = False
) -> tuple[OutputFolder, list[str]]:
    """Lock ``out`` for a comparison with ``settings`` and record them in ``out/comparison.json``.

    * a missing or empty folder is used as is;
    * a folder another ``lightning-gc compare`` holds is refused, naming that process;
    * a folder holding a comparison is refused unless ``resume`` (same settings: its finished runs are kept)
      or ``overwrite`` (what comparisons wrote there is removed first; anything else is left and listed);
    * a non-empty folder that holds no comparison is always refused: it is not this tool's to delete.

    Returns:
        the locked folder, and what ``overwrite`` left (paths relative to ``out``).

    Raises:
        ProjectError: for each refusal, saying which option to pass.
    """
    if resume and overwrite:
        raise ProjectError("`--resume` and `--overwrite` exclude each other: keep the finished runs, or start over")
    if out.exists() and not out.is_dir():
        raise ProjectError(f"{_named(out)} is a file; give a folder")
    _refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = OutputFolder(out, _lock(out))
    try:
        left = _take_over(folder, settings, resume, overwrite)
        folder.record(out / MANIFEST, out / LOCK_FILE)
        (out / MANIFEST).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    except BaseException:
        folder.close()
        raise
    return folder, left


def _refuse_foreign(out: Path) -> None:
    if out.is_dir() and not (out / MANIFEST).is_file() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ProjectError(f"{_named(out)} is not empty and holds no comparison ({MANIFEST}); choose another folder")


def _take_over(folder: OutputFolder, settings: dict[str, Any], resume: bool, overwrite: bool) -> list[str]:
    out, manifest = folder.path, folder.path / MANIFEST
    _refuse_foreign(out)  # again, now that no other comparison can be writing
    if not manifest.is_file():
        return []
    if overwrite:
        return folder.remove_written()
    if resume:
        _check_same(json.loads(manifest.read_text(encoding="utf-8")), settings, out)
        return []
    raise ProjectError(
        f"{_named(out)} already holds a comparison: {again('--resume')} to finish it (finished runs are kept)"
        f" or {again('--overwrite')} to start over"
    )


def _lock(out: Path) -> IO[str]:
    import fcntl

    handle = open(out / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held until the comparison ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ProjectError(
            f"{_named(out)} is in use by another lightning-gc compare (pid {holder}); wait for it to end{_or_another_out()}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _check_same(previous: dict[str, Any], settings: dict[str, Any], out: Path) -> None:
    keys = (set(previous) | set(settings)) - _RESUMABLE
    changed = sorted(k for k in keys if previous.get(k, _DEFAULTS.get(k)) != settings.get(k, _DEFAULTS.get(k)))
    if changed:
        detail = "; ".join(f"{k}: was {previous.get(k)!r}, now {settings.get(k)!r}" for k in changed)
        raise ProjectError(
            f"`--resume` would mix results: {out} was started with other settings ({detail}); {again('--overwrite')}"
            f"{_or_another_out()}"
        )


# Settings comparisons recorded before they existed had these values.
_DEFAULTS: dict[str, Any] = {"arms": ["baseline", "gc"], "sweep": [], "launcher": "local"}


def _legacy_written(out: Path) -> list[str]:
    runs = {p.parent.relative_to(out).as_posix() for p in out.glob("*/seed_*/train.log")}
    return [*(n for n in (MANIFEST, *_LEGACY_OUTPUTS) if (out / n).exists()), *sorted(runs)]


def _prune_empty_parents(folder: Path, root: Path) -> None:
    while folder != root and folder.is_relative_to(root) and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
