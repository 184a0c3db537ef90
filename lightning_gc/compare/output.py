"""The output folder of a comparison: never mixes the results of different comparisons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lightning_gc.compare.project import ProjectError

MANIFEST = "comparison.json"
# What may differ between the invocation that started a comparison and one resuming it: the number of
# seeds (more seeds add runs) and what only the summary uses.
_RESUMABLE = frozenset({"seeds", "metric", "mode", "target", "lightning_gc"})


def prepare_output(out: Path, settings: dict[str, Any], resume: bool = False, overwrite: bool = False) -> None:
    """Make ``out`` ready for a comparison with ``settings`` and record them in ``out/comparison.json``.

    * a missing or empty folder is used as is;
    * a folder holding a comparison is refused unless ``resume`` (same settings: its finished runs are kept)
      or ``overwrite`` (it is emptied first);
    * a non-empty folder that holds no comparison is always refused: it is not this tool's to delete.

    Raises:
        ProjectError: for each refusal, saying which option to pass.
    """
    if resume and overwrite:
        raise ProjectError("`--resume` and `--overwrite` exclude each other: keep the finished runs, or start over")
    if out.exists() and not out.is_dir():
        raise ProjectError(f"`--out` {out} is a file; give a folder")
    manifest = out / MANIFEST
    if out.is_dir() and any(out.iterdir()):
        if not manifest.is_file():
            raise ProjectError(
                f"`--out` {out} is not empty and holds no comparison ({MANIFEST}); choose another folder"
            )
        if overwrite:
            shutil.rmtree(out)
        elif resume:
            _check_same(json.loads(manifest.read_text(encoding="utf-8")), settings, out)
        else:
            raise ProjectError(
                f"`--out` {out} already holds a comparison: pass `--resume` to finish it (finished runs are kept)"
                " or `--overwrite` to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def _check_same(previous: dict[str, Any], settings: dict[str, Any], out: Path) -> None:
    keys = (set(previous) | set(settings)) - _RESUMABLE
    changed = sorted(k for k in keys if previous.get(k) != settings.get(k))
    if changed:
        detail = "; ".join(f"{k}: was {previous.get(k)!r}, now {settings.get(k)!r}" for k in changed)
        raise ProjectError(
            f"`--resume` would mix results: {out} was started with other settings ({detail}); pass `--overwrite` or"
            " another `--out`"
        )
