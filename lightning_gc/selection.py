"""Which parameters Gradient Centralization applies to, and where their output units are.

The rule of the paper is "weights of conv, linear and RNN layers": every parameter with ``ndim >= 2``.
When the owning modules are known, module types refine it: ``conv_only`` keeps convolution weights only,
embedding tables are excluded by default (they are lookup tables, not neurons), and transposed
convolutions keep their output channels in dim 1.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_gc.centralize import RowLayout

ModuleSpec = str | type

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
TRANSPOSED_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
DEFAULT_EXCLUDED_MODULES: tuple[str, ...] = ("Embedding", "EmbeddingBag")


@dataclass(frozen=True)
class Target:
    """One parameter that GC applies to.

    Args:
        param: the parameter whose ``.grad`` is centralized.
        name: its qualified name, or ``"param_<i>"`` when only an iterable of parameters was given.
        layout: where its output units are.
    """

    param: nn.Parameter
    name: str
    layout: RowLayout = RowLayout()


@dataclass
class Owner:
    """The module a parameter belongs to and the parameter's name in it."""

    name: str
    module: nn.Module | None = None
    attr: str = ""


@dataclass
class Selector:
    """Decides, parameter by parameter, whether GC applies and along which dims.

    Args:
        conv_only: only weights of convolution modules (``Conv1d/2d/3d`` and their transposed variants).
        exclude: ``fnmatch`` patterns matched against qualified parameter names (``"head.*"``).
        exclude_modules: module classes, or their names, whose parameters are left alone.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> [t.name for t in Selector().select_from_module(model)]
        ['1.weight']
    """

    conv_only: bool = False
    exclude: Sequence[str] = ()
    exclude_modules: Sequence[ModuleSpec] = DEFAULT_EXCLUDED_MODULES
    _unmatched: set[str] = field(default_factory=set, init=False, repr=False)

    def select_from_module(self, module: nn.Module, params: Iterable[nn.Parameter] | None = None) -> list[Target]:
        """Targets among ``params`` (default: all of ``module``'s), using ``module`` to know their owners."""
        owners = owners_of(module)
        self._unmatched = {p for p in self.exclude if not any(fnmatch.fnmatchcase(o.name, p) for o in owners.values())}
        candidates = module.parameters() if params is None else params
        targets = []
        for index, param in enumerate(_unique(candidates)):
            owner = owners.get(param, Owner(name=f"param_{index}"))
            target = self._target(param, owner)
            if target is not None:
                targets.append(target)
        return targets

    def select_from_params(self, params: Iterable[nn.Parameter]) -> list[Target]:
        """Targets among bare parameters: only the dimension rule and ``exclude`` patterns apply."""
        if self.conv_only:
            raise ValueError(
                "`conv_only=True` needs module types: pass the model (an `nn.Module`), not an iterable of parameters"
            )
        params = list(_unique(params))
        names = [f"param_{i}" for i in range(len(params))]
        self._unmatched = {p for p in self.exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)}
        targets = [self._target(p, Owner(name=n)) for p, n in zip(params, names)]
        return [t for t in targets if t is not None]

    @property
    def unmatched_patterns(self) -> list[str]:
        """``exclude`` patterns that matched no parameter name in the last selection."""
        return sorted(self._unmatched)

    def layout_for(self, owner: Owner, ndim: int) -> RowLayout | None:
        """The layout GC uses for a trainable parameter of ``ndim`` logical dims owned by ``owner``, or None.

        For callers whose tensors are not in their logical shape (FSDP's flattened shards): they pass the
        logical ``ndim`` and report the names they considered with :meth:`track_names`.

        Example:
            >>> Selector().layout_for(Owner("0.weight", nn.Linear(2, 3), "weight"), ndim=2)
            RowLayout(out_dim=0, groups=1)
        """
        if ndim < 2:
            return None
        if any(fnmatch.fnmatchcase(owner.name, pattern) for pattern in self.exclude):
            return None
        module = owner.module
        if module is not None and _matches_any(module, self.exclude_modules):
            return None
        is_conv_weight = isinstance(module, CONV_TYPES) and owner.attr == "weight"
        if self.conv_only and not is_conv_weight:
            return None
        return layout_of(module, owner.attr)

    def track_names(self, names: Iterable[str]) -> None:
        """Record the parameter names of a selection made with :meth:`layout_for`, for :attr:`unmatched_patterns`."""
        names = list(names)
        self._unmatched = {p for p in self.exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)}

    def _target(self, param: nn.Parameter, owner: Owner) -> Target | None:
        if not param.requires_grad:
            return None
        layout = self.layout_for(owner, param.ndim)
        return None if layout is None else Target(param=param, name=owner.name, layout=layout)


def layout_of(module: nn.Module | None, attr: str) -> RowLayout:
    """Output-unit layout of ``module.<attr>``: dim 1 for transposed-conv weights, dim 0 for everything else.

    Example:
        >>> layout_of(nn.ConvTranspose2d(4, 6, 3, groups=2), "weight")
        RowLayout(out_dim=1, groups=2)
    """
    if isinstance(module, TRANSPOSED_CONV_TYPES) and attr == "weight":
        return RowLayout(out_dim=1, groups=module.groups)
    return RowLayout()


def owners_of(module: nn.Module) -> dict[nn.Parameter, Owner]:
    """Each parameter of ``module`` mapped to its first owner (shared parameters keep the first name)."""
    owners: dict[nn.Parameter, Owner] = {}
    for module_name, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub.named_parameters(recurse=False):
            if param not in owners:
                name = f"{module_name}.{attr}" if module_name else attr
                owners[param] = Owner(name=name, module=sub, attr=attr)
    return owners


def validate_module_specs(specs: Sequence[ModuleSpec], argument: str) -> tuple[ModuleSpec, ...]:
    """Check that every entry is an ``nn.Module`` subclass or a non-empty class name."""
    if isinstance(specs, (str, type)):
        raise ValueError(f"`{argument}` must be a list of module classes or class names, got {specs!r}")
    for spec in specs:
        valid = (isinstance(spec, type) and issubclass(spec, nn.Module)) or (isinstance(spec, str) and spec)
        if not valid:
            raise ValueError(
                f"`{argument}` accepts `nn.Module` subclasses or their names (e.g. 'Embedding'), got {spec!r}"
            )
    return tuple(specs)


def _matches_any(module: nn.Module, specs: Sequence[ModuleSpec]) -> bool:
    names = {n for cls in type(module).__mro__ for n in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")}
    return any(isinstance(module, spec) if isinstance(spec, type) else spec in names for spec in specs)


def _unique(params: Iterable[nn.Parameter]) -> Iterable[nn.Parameter]:
    seen: set[int] = set()
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            yield param
