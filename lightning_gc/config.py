"""The options of Gradient Centralization, validated once for the callback and the functional API alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_gc.centralize import MODES, Mode
from lightning_gc.selection import DEFAULT_EXCLUDED_MODULES, ModuleSpec, Selector, validate_module_specs


@dataclass(frozen=True)
class GCConfig:
    """Validated GC options; see :class:`lightning_gc.GradientCentralization` for their meaning.

    Raises:
        ValueError: naming the argument and the accepted values, for any invalid option.

    Example:
        >>> GCConfig(mode="tensor").mode
        'tensor'
    """

    conv_only: bool = False
    mode: Mode = "channel"
    centralize_weight_decay: bool = False
    exclude: tuple[str, ...] = ()
    exclude_modules: tuple[ModuleSpec, ...] = DEFAULT_EXCLUDED_MODULES
    compile: bool | str = False

    def __post_init__(self) -> None:
        _check_bool(self.conv_only, "conv_only")
        _check_bool(self.centralize_weight_decay, "centralize_weight_decay")
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "exclude", _patterns(self.exclude))
        object.__setattr__(self, "exclude_modules", validate_module_specs(self.exclude_modules, "exclude_modules"))
        if self.compile is not False:
            from lightning_gc.executor import _backend  # imports torch._dynamo: only when asked for

            _backend(self.compile)
        object.__setattr__(self, "_key", self._text())  # read on every step: computed once

    def selector(self) -> Selector:
        """A fresh :class:`~lightning_gc.selection.Selector` for these options."""
        return Selector(conv_only=self.conv_only, exclude=self.exclude, exclude_modules=self.exclude_modules)

    def key(self) -> str:
        """A stable text form, distinct per configuration (used for the callback's ``state_key``).

        ``compile`` is left out: it changes speed, not results.
        """
        return self._key  # type: ignore[attr-defined]

    def _text(self) -> str:
        modules = [m if isinstance(m, str) else f"{m.__module__}.{m.__qualname__}" for m in self.exclude_modules]
        return (
            f"conv_only={self.conv_only}, mode={self.mode}, centralize_weight_decay={self.centralize_weight_decay},"
            f" exclude={list(self.exclude)}, exclude_modules={modules}"
        )


def _check_bool(value: object, argument: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be True or False, got {value!r}")


def _patterns(value: Sequence[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                f"`exclude` accepts non-empty fnmatch patterns of parameter names (e.g. 'head.*'), got {pattern!r}"
            )
    return patterns
