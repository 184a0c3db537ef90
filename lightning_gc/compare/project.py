"""A project to compare: a folder following the template convention, checked before any run starts."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from lightning_gc.templating import find_templates, render

ARMS = ("baseline", "gc")  # the default arms; any `configs/<arm>.yaml` of a project can be one
BASELINE = "baseline"
MODES = ("min", "max")
_GC_CALLBACK = "GradientCentralization"
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ProjectError(ValueError):
    """The project, a config or an option cannot give a valid comparison; the message says what to change."""


@dataclass(frozen=True)
class Project:
    """A resolved project: where it is and what its configs say.

    Args:
        root: the project folder (holds ``train.py`` and ``configs/``).
        name: how the comparison names it: the template name or the folder name.
        overlays: setting configs applied after each arm's config, absolute paths, in order.
        metric: the primary validation metric, e.g. ``"val/acc"``.
        mode: ``"max"`` if higher is better, ``"min"`` if lower is better.
        arms: the arms compared, in order; the first is the reference of the differences column.
    """

    root: Path
    name: str
    overlays: tuple[Path, ...]
    metric: str
    mode: str
    arms: tuple[str, ...] = ARMS

    def arm_config(self, arm: str) -> Path:
        """The config file of ``arm``: ``configs/<arm>.yaml``."""
        return self.root / "configs" / f"{arm}.yaml"


def load_project(
    root: str | os.PathLike[str],
    name: str | None = None,
    configs: Sequence[str] = (),
    metric: str | None = None,
    mode: str | None = None,
    arms: Sequence[str] = ARMS,
) -> Project:
    """Check a project folder and read the primary metric from its ``ModelCheckpoint``.

    Each arm's effective config is its own file followed by ``configs`` (later files override earlier ones
    key by key; lists such as ``trainer.callbacks`` are replaced whole, as LightningCLI does).

    Args:
        root: the project folder.
        name: the project's name in the summary; defaults to the folder name.
        configs: setting configs applied after each arm's config, relative to ``root`` (or absolute).
        metric: overrides the checkpoint's ``monitor``.
        mode: ``"min"`` or ``"max"``; overrides the checkpoint's ``mode``. Required when ``metric`` is not
            the checkpoint's monitor.
        arms: the arms, each a ``configs/<arm>.yaml`` of the project.

    Raises:
        ProjectError: no ``train.py`` or arm config; a setting config that does not exist; an arm named
            ``gc*`` without the ``GradientCentralization`` callback or the ``baseline`` with it; a logger that
            is not a ``TensorBoardLogger``; no metric to compare; an invalid ``mode``.

    Example:
        >>> load_project("no/such/folder")
        Traceback (most recent call last):
        ...
        lightning_gc.compare.project.ProjectError: PROJECT_DIR 'no/such/folder' is not a folder
    """
    folder = Path(root)
    if not folder.is_dir():
        raise ProjectError(f"PROJECT_DIR {str(root)!r} is not a folder")
    folder = folder.resolve()
    arms = check_arm_names(arms)
    if not (folder / "train.py").is_file():
        raise ProjectError(
            f"PROJECT_DIR {str(root)!r} does not follow the template convention: missing train.py"
            + "".join(f", configs/{a}.yaml" for a in arms if not (folder / "configs" / f"{a}.yaml").is_file())
        )
    missing = [a for a in arms if not (folder / "configs" / f"{a}.yaml").is_file()]
    if missing:
        available = ", ".join(available_arms(folder)) or "none"
        raise ProjectError(
            f"`--arms`: {', '.join(f'configs/{a}.yaml' for a in missing)} not found in {folder};"
            f" arms available: {available}"
        )
    if mode is not None and mode not in MODES:
        raise ProjectError(f"`--mode` must be one of {MODES}, got {mode!r}")
    overlays = tuple(_find_overlay(folder, c) for c in configs)
    effective = {arm: _effective_config(folder / "configs" / f"{arm}.yaml", overlays) for arm in arms}
    _check_arms(effective, overlays)
    checkpoints = {arm: _checkpoint_target(effective[arm]) for arm in arms}
    if len(set(checkpoints.values())) > 1:
        described = ", ".join(f"{arm} {target}" for arm, target in checkpoints.items())
        raise ProjectError(
            f"the arms' ModelCheckpoint monitor/mode differ ({described}); they must select the best checkpoint the"
            " same way"
        )
    metric, mode = _primary_metric(checkpoints[arms[0]], metric, mode)
    return Project(folder, name or folder.name, overlays, metric, mode, arms)


def check_arm_names(arms: Sequence[str]) -> tuple[str, ...]:
    """``arms`` as a tuple, or a :class:`ProjectError` naming ``--arms`` when they cannot be compared.

    Example:
        >>> check_arm_names(["baseline", "gc"])
        ('baseline', 'gc')
        >>> check_arm_names(["gc", "gc"])
        Traceback (most recent call last):
        ...
        lightning_gc.compare.project.ProjectError: `--arms` must name at least 2 different arms (configs/<arm>.yaml), got gc,gc
    """
    names = tuple(arms) if not isinstance(arms, str) else tuple(arms.split(","))
    shown = ",".join(str(a) for a in names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ProjectError(f"`--arms` must name at least 2 different arms (configs/<arm>.yaml), got {shown}")
    for name in names:
        if not isinstance(name, str) or not _ARM_NAME.fullmatch(name):
            raise ProjectError(
                f"`--arms`: {name!r} is not an arm name (letters, digits, `_`, `-`; the stem of configs/<arm>.yaml)"
            )
    return names


def available_arms(root: Path) -> list[str]:
    """The arms a project offers: the stems of its ``configs/*.yaml``."""
    return sorted(p.stem for p in (root / "configs").glob("*.yaml"))


def _find_overlay(root: Path, config: str) -> Path:
    candidates = [Path(config)] if os.path.isabs(config) else [root / config, Path(config)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    settings = sorted(p.relative_to(root).as_posix() for p in (root / "configs").glob("settings/*.yaml"))
    raise ProjectError(
        f"`--config` {config!r} not found in the project ({root}) nor here; settings available: {', '.join(settings) or 'none'}"
    )


def _effective_config(arm_file: Path, overlays: Sequence[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in (arm_file, *overlays):
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ProjectError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(content, dict):
            raise ProjectError(f"{path} must hold a mapping of LightningCLI options, got {type(content).__name__}")
        merged = _merge(merged, content)
    return merged


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _class_name(entry: Any) -> str:
    path = entry.get("class_path", "") if isinstance(entry, dict) else str(entry or "")
    return str(path).rsplit(".", 1)[-1]


def _callbacks(config: dict[str, Any]) -> list[Any]:
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _check_arms(effective: dict[str, dict[str, Any]], overlays: Sequence[Path]) -> None:
    """The baseline must train without GC, an arm named ``gc*`` with it; every arm logs to TensorBoard."""
    after = f" (after {', '.join(str(o) for o in overlays)})" if overlays else ""
    for arm, cfg in effective.items():
        has_gc = any(_class_name(c) == _GC_CALLBACK for c in _callbacks(cfg))
        if arm.startswith("gc") and not has_gc:
            raise ProjectError(
                f"configs/{arm}.yaml{after} has no lightning_gc.GradientCentralization in trainer.callbacks:"
                f" the {arm} arm needs it"
            )
        if arm == BASELINE and has_gc:
            raise ProjectError(
                f"configs/baseline.yaml{after} has the lightning_gc.GradientCentralization callback:"
                " the baseline must train without it"
            )
        logger = (cfg.get("trainer") or {}).get("logger")
        if _class_name(logger) != "TensorBoardLogger":
            raise ProjectError(
                f"configs/{arm}.yaml{after}: trainer.logger must be a lightning.pytorch.loggers.TensorBoardLogger in"
                " class_path/init_args form; the comparison reads its event files"
            )


def _checkpoint_target(config: dict[str, Any]) -> tuple[str | None, str]:
    for callback in _callbacks(config):
        if _class_name(callback) == "ModelCheckpoint":
            init = (callback.get("init_args") or {}) if isinstance(callback, dict) else {}
            return init.get("monitor"), init.get("mode", "min")
    return None, "min"


def _primary_metric(checkpoint: tuple[str | None, str], metric: str | None, mode: str | None) -> tuple[str, str]:
    monitor, checkpoint_mode = checkpoint
    if metric is None:
        if monitor is None:
            raise ProjectError(
                "the configs have no ModelCheckpoint with a `monitor`: pass `--metric` (e.g. val/acc) and `--mode`"
            )
        metric = monitor
    if mode is None:
        if metric != monitor:
            raise ProjectError(f"`--metric {metric}` is not the checkpoint's monitor: pass `--mode` (min or max) too")
        mode = checkpoint_mode
    if mode not in MODES:
        raise ProjectError(f"the ModelCheckpoint `mode` must be one of {MODES}, got {mode!r}")
    return metric, mode


def template_names() -> list[str]:
    """Names of the templates ``lightning-gc new`` can render."""
    try:
        return list(find_templates())
    except FileNotFoundError:
        return []


@contextmanager
def resolve_project_dir(project: str) -> Iterator[tuple[Path, str]]:
    """Yield ``(folder, name)`` for PROJECT_DIR: the folder itself, or a template rendered into a temp folder.

    The rendered copy is deleted on exit.

    Raises:
        ProjectError: when ``project`` is neither a folder nor a template name.
    """
    if os.path.isdir(project):
        yield Path(project), Path(project).resolve().name
        return
    names = template_names()
    if project not in names:
        raise ProjectError(
            f"PROJECT_DIR {project!r} is neither a folder nor a template name; templates: {', '.join(names) or 'none'}"
        )
    with tempfile.TemporaryDirectory(prefix="lightning-gc-compare-") as tmp:
        yield _render(project, Path(tmp) / project), project


def _render(template: str, destination: Path) -> Path:
    """Render ``template`` into ``destination`` with ``lightning-gc new``'s machinery."""
    return render(template, destination, project_name=template.replace("-", " "))
