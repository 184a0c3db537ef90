"""The options of Gradient Centralization, validated once, the same way for every entry point.

The callback, :func:`~lightning_gc.centralize_gradients`, :func:`~lightning_gc.describe` and
``centralize_updates`` all build a :class:`GCConfig` from what the user passed, with no conversion of
their own: a single string for ``exclude`` is one pattern, for ``exclude_modules`` an error, ``None`` or a wrong type is
a ``ValueError`` naming the argument and what it accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lightning_gc.layouts import MODES, Mode

ModuleSpec = str | type
DEFAULT_EXCLUDED_MODULES: tuple[str, ...] = ("Embedding", "EmbeddingBag")

ApplyTo = Literal["gradient", "update"]
APPLY_TO: tuple[str, ...] = ("gradient", "update")


@dataclass(frozen=True)
class GCConfig:
    """Validated GC options; see :class:`lightning_gc.GradientCentralization` for their meaning.

    ``exclude`` accepts one pattern or a sequence of them; ``exclude_modules`` a sequence of classes or class
    names (a lone name is refused, so that ``"Linear"`` is never read as its letters). Both are stored as tuples.

    Raises:
        ValueError: naming the argument and the accepted values, for any invalid option.

    Example:
        >>> GCConfig(mode="tensor", exclude="head.*").exclude
        ('head.*',)
    """

    conv_only: bool = False
    mode: Mode = "channel"
    centralize_weight_decay: bool = False
    exclude: tuple[str, ...] = ()
    exclude_modules: tuple[ModuleSpec, ...] = DEFAULT_EXCLUDED_MODULES
    compile: bool | str = False
    apply_to: ApplyTo = "gradient"

    def __post_init__(self) -> None:
        check_bool(self.conv_only, "conv_only")
        check_bool(self.centralize_weight_decay, "centralize_weight_decay")
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {self.mode!r}")
        if self.apply_to not in APPLY_TO:
            raise ValueError(f"`apply_to` must be one of {APPLY_TO}, got {self.apply_to!r}")
        if self.apply_to == "update" and self.centralize_weight_decay:
            raise ValueError(
                "`centralize_weight_decay=True` cannot be combined with `apply_to='update'`: the update already"
                " contains the optimizer's weight decay, and centralizing it centralizes the decay too. Use"
                " `apply_to='gradient'` for the paper's GC(g + lambda * w), or drop `centralize_weight_decay`."
            )
        object.__setattr__(self, "exclude", _patterns(self.exclude))
        object.__setattr__(self, "exclude_modules", _module_specs(self.exclude_modules))
        if self.compile is not False:
            from lightning_gc.compiled import compile_backend  # imports torch._dynamo: only when asked for

            compile_backend(self.compile)
        key = self._text()
        object.__setattr__(self, "_key", key)  # read on every step: computed once
        object.__setattr__(self, "_plan_key", (key, repr(self.compile)))

    def key(self) -> str:
        """A stable text form of the options that change results (the callback's ``state_key``).

        ``compile`` is left out: it changes speed, not results, and checkpoints stay loadable across it.
        """
        return self._key  # type: ignore[no-any-return, attr-defined]

    def plan_key(self) -> tuple[str, str]:
        """Everything that changes a plan, ``compile`` included: the key of :class:`~lightning_gc.plan_cache.PlanCache`."""
        return self._plan_key  # type: ignore[no-any-return, attr-defined]

    def _text(self) -> str:
        modules = [m if isinstance(m, str) else f"{m.__module__}.{m.__qualname__}" for m in self.exclude_modules]
        text = (
            f"conv_only={self.conv_only}, mode={self.mode}, centralize_weight_decay={self.centralize_weight_decay},"
            f" exclude={list(self.exclude)}, exclude_modules={modules}"
        )
        return text if self.apply_to == "gradient" else f"{text}, apply_to={self.apply_to}"


def check_bool(value: object, argument: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be True or False, got {value!r}")


def _patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence):
        raise ValueError(
            f"`exclude` must be an fnmatch pattern of parameter names or a list of them (e.g. ['head.*']), got {value!r}"
        )
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                f"`exclude` accepts non-empty fnmatch patterns of parameter names (e.g. 'head.*'), got {pattern!r}"
            )
    return patterns


def _module_specs(value: Any) -> tuple[ModuleSpec, ...]:
    if isinstance(value, (str, type)) or not isinstance(value, Sequence):  # a lone name is refused, as always
        raise ValueError(
            f"`exclude_modules` must be a module class or class name, or a list of them (e.g. ['Embedding']), got {value!r}"
        )
    specs = tuple(value)
    for spec in specs:
        valid = (isinstance(spec, type) and issubclass(spec, nn.Module)) or (isinstance(spec, str) and spec)
        if not valid:
            raise ValueError(
                f"`exclude_modules` accepts `nn.Module` subclasses or their names (e.g. 'Embedding'), got {spec!r}"
            )
    return specs
