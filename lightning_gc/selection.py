"""Which parameters Gradient Centralization applies to, and where their output units are.

:func:`select` turns a model (or parameters, or an optimizer's parameters) and a
:class:`~lightning_gc.config.GCConfig` into :class:`Target` s, each with its
:class:`~lightning_gc.layouts.RowLayout` and coupled weight-decay coefficient, and one :class:`Choice` per
parameter saying what was decided and why (the rows of :func:`lightning_gc.describe`). Nothing here
builds an executor or touches a gradient. Sharded adapters, whose tensors are not in their logical shape,
decide parameter by parameter with :meth:`Selector.decide`.

The rules, in order: frozen parameters, ``exclude`` patterns, tensors with fewer than 2 dims, zero-size
tensors and ``exclude_modules`` (embedding tables by default) are skipped; a parameter whose layer is in
the layout registry (:mod:`lightning_gc.layouts`) gets that layout, or is skipped when the registry says
"never" (normalization scales, attention bias tokens, the weight-norm magnitude); ``conv_only`` keeps
convolution weights only; any other parameter of 2+ dims keeps the paper's dim-0 rule but is marked
"assumed". Position embeddings and class/register tokens held as bare parameters
(:data:`TOKEN_PARAMETERS`) are skipped like embedding tables: they are learned inputs, not neurons. A
unit whose averaged dims all have size 1 is skipped: GC would zero its gradient.

Names are the user's: wrapper components (Fabric's ``_forward_module``, ``torch.compile``'s ``_orig_mod``,
FSDP's ``_fsdp_wrapped_module``/``_checkpoint_wrapped_module``, and the ``module`` of DDP/DataParallel)
are left out, both for matching ``exclude`` and in the report.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import nn
from torch.nn.parameter import is_lazy

from lightning_gc.config import DEFAULT_EXCLUDED_MODULES, GCConfig, ModuleSpec
from lightning_gc.layouts import DIM0, REGISTRY, Mode, RowLayout
from lightning_gc.weight_decay import decay_for_group

if TYPE_CHECKING:
    from torch.optim import Optimizer

__all__ = ["DEFAULT_EXCLUDED_MODULES", "Choice", "ModuleSpec", "Owner", "Selection", "Selector", "Target", "select"]

Decision = Literal["centralized", "assumed", "skipped"]
Warn = Callable[[str], None]

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
TOKEN_PARAMETERS: tuple[str, ...] = (
    "pos_embed*",
    "*position_embedding*",
    "*pos_embedding*",
    "cls_token",
    "class_token",
    "reg_token*",
    "register_token*",
    "dist_token",
    "mask_token",
    "*relative_position_bias_table",
)
"""Attribute names of bare parameters that hold position embeddings or class/register tokens: learned
inputs added to or prepended to the sequence, one vector per position or token, like embedding rows. GC
averages over the units of a neuron's weight; these have none, and centralizing them along dim 0 (often of
size 1) would zero or distort their gradient. Skipped like embedding tables; ``register_layout`` opts in."""

WRAPPER_COMPONENTS = frozenset({"_forward_module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
"""Module-name components that wrappers insert (Fabric, ``torch.compile``, FSDP, activation checkpointing)."""
_MODULE_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"})  # hold it as `.module`


@dataclass(frozen=True)
class Target:
    """One parameter that GC applies to.

    Args:
        param: the parameter whose ``.grad`` is centralized.
        name: the user's name for it, or ``"param_<i>"`` when only an iterable of parameters was given.
        layout: where its output units are.
        decay: the coupled weight-decay coefficient to compensate for (0.0: none).
    """

    param: nn.Parameter
    name: str
    layout: RowLayout = DIM0
    decay: float = 0.0


@dataclass(frozen=True)
class Choice:
    """What the selection decided for one parameter (a row of :class:`~lightning_gc.selection_report.SelectionReport`).

    Args:
        name: the user's name of the parameter.
        shape: its logical shape.
        module: the owning layer's type name (``""`` when unknown).
        decision: ``"centralized"``, ``"assumed"`` (dim-0 rule, no registered layout) or ``"skipped"``.
        layout: the layout used, for centralized and assumed parameters.
        dims: the dims averaged over, for centralized and assumed parameters.
        reason: why, for skipped and assumed parameters (and the registry's note for centralized ones).
    """

    name: str
    shape: tuple[int, ...]
    module: str
    decision: Decision
    layout: RowLayout | None = None
    dims: tuple[int, ...] = ()
    reason: str = ""

    @property
    def selected(self) -> bool:
        """Whether GC applies to the parameter."""
        return self.decision != "skipped"


@dataclass(frozen=True)
class Owner:
    """The layer a parameter belongs to and the parameter's name in it, as the registry sees it.

    Args:
        name: the user's qualified name of the parameter.
        module: the owning layer (for ``torch.nn.utils.parametrize``: the parametrized layer).
        attr: the tensor's name on that layer (``"weight"`` for ``parametrizations.weight.original``).
        never: a reason this parameter is never centralized, whatever its layer (the weight-norm magnitude).
    """

    name: str
    module: nn.Module | None = None
    attr: str = ""
    never: str = ""


@dataclass
class Selection:
    """The result of :func:`select`: what GC applies to, and a :class:`Choice` per parameter considered."""

    targets: list[Target]
    choices: list[Choice]
    unmatched_patterns: list[str] = field(default_factory=list)
    unmatched_modules: list[str] = field(default_factory=list)

    @property
    def provisional(self) -> bool:
        """Whether a Lazy layer had no shape yet: a plan from this selection must not be reused once it has one."""
        return any(c.shape == () and c.reason.startswith("uninitialized") for c in self.choices)

    @property
    def assumed(self) -> list[Choice]:
        """Parameters centralized by the dim-0 rule because no layout is registered for them."""
        return [c for c in self.choices if c.decision == "assumed"]


@dataclass
class Selector:
    """Decides, parameter by parameter, whether GC applies and along which dims.

    Args:
        conv_only: only weights of convolution modules (``Conv1d/2d/3d`` and their transposed variants).
        exclude: ``fnmatch`` patterns matched against the user's parameter names (``"head.*"``).
        exclude_modules: module classes, or their names, whose parameters are left alone.
        mode: ``"channel"`` or ``"tensor"`` (a tensor-mode unit is the whole tensor).

    Example:
        >>> Selector().decide(Owner("0.weight", nn.Linear(2, 3), "weight"), (3, 2)).layout
        RowLayout(out_dims=(0,), groups=1)
    """

    conv_only: bool = False
    exclude: Sequence[str] = ()
    exclude_modules: Sequence[ModuleSpec] = DEFAULT_EXCLUDED_MODULES
    mode: Mode = "channel"

    @classmethod
    def of(cls, config: GCConfig) -> Selector:
        """The selector for ``config``'s options."""
        return cls(config.conv_only, config.exclude, config.exclude_modules, config.mode)

    def decide(self, owner: Owner, shape: Sequence[int], requires_grad: bool = True) -> Choice:
        """The decision for a parameter of logical ``shape`` owned by ``owner``."""
        shape = tuple(int(s) for s in shape)
        module_type = _type_name(owner.module)

        def skip(reason: str) -> Choice:
            return Choice(owner.name, shape, module_type, "skipped", reason=reason)

        if not requires_grad:
            return skip("frozen (requires_grad=False)")
        pattern = next((p for p in self.exclude if fnmatch.fnmatchcase(owner.name, p)), None)
        if pattern is not None:
            return skip(f"matches exclude pattern {pattern!r}")
        if len(shape) < 2:
            return skip("ndim < 2: a bias or scale, no output unit to average within")
        if 0 in shape:
            return skip("zero-size tensor: nothing to centralize")
        if owner.module is not None and _matches_any(owner.module, self.exclude_modules):
            return skip(f"{module_type} is in exclude_modules")
        if owner.never:
            return skip(owner.never)
        is_conv_weight = isinstance(owner.module, CONV_TYPES) and owner.attr == "weight"
        entry = REGISTRY.entry(owner.module, owner.attr) if owner.module is not None else None
        if entry is not None and entry.out_dims is None:
            return skip(entry.reason or f"registered as never centralized ({entry.class_path}.{entry.param})")
        if self.conv_only and not is_conv_weight:
            return skip("conv_only: not a convolution weight")
        if entry is not None:
            layout = entry.layout_for(owner.module)  # type: ignore[arg-type]
            decision: Decision = "centralized"
            reason = entry.reason
        elif owner.module is not None and _is_token(owner.attr):
            return skip(
                "position embedding / class or register token: a learned input, not a neuron weight (skipped like"
                f" embedding tables); lightning_gc.register_layout({_path(owner.module)!r}, {owner.attr!r},"
                " out_dims=(0,)) centralizes it"
            )
        else:
            layout, decision = DIM0, "assumed"
            reason = _assumed_reason(owner)
        if layout is None or not layout.fits(len(shape)):
            return skip(f"registered output dims {entry.out_dims if entry else ()} do not fit shape {shape}")
        if layout.entries_per_unit(shape, self.mode) <= 1:
            return skip("every averaged dim has size 1: GC would zero this gradient")
        return Choice(
            owner.name, shape, module_type, decision, layout, layout.averaged_dims(len(shape), self.mode), reason
        )

    def unmatched_patterns(self, names: Iterable[str]) -> list[str]:
        """``exclude`` patterns that match none of ``names``."""
        names = list(names)
        return sorted(p for p in self.exclude if not any(fnmatch.fnmatchcase(n, p) for n in names))

    def unmatched_modules(self, module: nn.Module | None) -> list[str]:
        """User-given ``exclude_modules`` entries (not the defaults) that match no submodule of ``module``."""
        if module is None:
            return []
        modules = list(module.modules())
        return sorted(
            _spec_name(spec)
            for spec in self.exclude_modules
            if spec not in DEFAULT_EXCLUDED_MODULES and not any(_matches_any(m, (spec,)) for m in modules)
        )


def select(
    model_or_params: nn.Module | Iterable[nn.Parameter],
    config: GCConfig,
    optimizer: Optimizer | None = None,
    *,
    warn: Warn | None = None,
    only: set[int] | None = None,
    what: str = "",
) -> Selection:
    """The targets of GC among ``model_or_params`` (restricted to ``optimizer``'s parameters if given).

    Given a module, owners (and so layer types) are known; given an iterable of parameters, names are
    ``param_<i>`` and every parameter of 2+ dims is "assumed". With an optimizer and
    ``config.centralize_weight_decay``, each target carries its group's coupled decay coefficient.

    Args:
        model_or_params: the model, or the parameters to consider.
        config: the validated options.
        optimizer: consider only its parameters, in its param-group order.
        warn: receives the selection's warnings (unmatched ``exclude``/``exclude_modules``, nothing
            selected, decay that cannot be centralized); ``None``: no warnings.
        only: further restrict to parameters with these ``id`` s.
        what: how warnings name what was searched (default: the optimizer's or the model's type).

    Raises:
        ValueError: for ``conv_only=True`` with bare parameters (module types are needed).

    Example:
        >>> from lightning_gc.config import GCConfig
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> [(t.name, t.layout.out_dims) for t in select(model, GCConfig()).targets]
        [('1.weight', (0,))]
    """
    module = model_or_params if isinstance(model_or_params, nn.Module) else None
    given = None if module is not None else list(_unique(model_or_params))  # type: ignore[arg-type]
    if given is not None and config.conv_only:
        raise ValueError(
            "`conv_only=True` needs module types: pass the model (an `nn.Module`), not an iterable of parameters"
        )
    selector = Selector.of(config)
    owners = owners_of(module) if module is not None else {p: Owner(f"param_{i}") for i, p in enumerate(given or ())}
    if given is not None and only is None and optimizer is not None:
        only = {id(p) for p in given}
    groups: list[tuple[dict[str, Any] | None, list[nn.Parameter]]]
    if optimizer is not None:
        groups = [(g, [p for p in g["params"] if only is None or id(p) in only]) for g in optimizer.param_groups]
    else:
        candidates = module.parameters() if module is not None else given
        groups = [(None, [p for p in _unique(candidates or ()) if only is None or id(p) in only])]
    targets, choices = [], []
    quiet: Warn = lambda message: None  # noqa: E731
    for group, params in groups:
        group_choices = []
        for index, param in enumerate(params):
            owner = owners.get(param) or Owner(f"param_{index}")
            if is_lazy(param):  # a Lazy layer before its first forward: no shape yet
                reason = "uninitialized (a Lazy layer before its first forward): no shape to plan for yet"
                group_choices.append(
                    (param, Choice(owner.name, (), _type_name(owner.module), "skipped", reason=reason))
                )
                continue
            group_choices.append((param, selector.decide(owner, param.shape, param.requires_grad)))
        decay = 0.0
        selected = any(c.selected for _, c in group_choices)
        if optimizer is not None and group is not None and config.centralize_weight_decay and selected:
            decay = decay_for_group(optimizer, group, warn or quiet)
        for param, choice in group_choices:
            choices.append(choice)
            if choice.selected:
                targets.append(Target(param, choice.name, choice.layout or DIM0, decay))
    names = [o.name for o in owners.values()]
    selection = Selection(targets, choices, selector.unmatched_patterns(names), selector.unmatched_modules(module))
    if warn is not None:
        if not what:
            what = f"{type(optimizer).__name__} optimizer" if optimizer is not None else type(model_or_params).__name__
            what = what if module is not None or optimizer is not None else "given parameters"
        warn_about_selection(selection, what, warn)
    return selection


def warn_about_selection(selection: Selection, what: str, warn: Warn) -> None:
    """The selection's warnings: ``exclude``/``exclude_modules`` entries that matched nothing, nothing selected."""
    if selection.unmatched_patterns:
        warn(f"GradientCentralization `exclude` patterns matched no parameter: {selection.unmatched_patterns}")
    if selection.unmatched_modules:
        warn(f"GradientCentralization `exclude_modules` entries matched no module: {selection.unmatched_modules}")
    if not any(c.selected for c in selection.choices):
        warn(
            f"GradientCentralization found nothing to centralize in the {what}: GC applies to weights with"
            " ndim >= 2 (conv, linear, RNN), minus `exclude`/`exclude_modules` (and non-conv layers if `conv_only`)."
        )


def owners_of(module: nn.Module) -> dict[nn.Parameter, Owner]:
    """Each parameter of ``module`` mapped to its first owner, with the user's name (wrappers stripped).

    Parameters of ``torch.nn.utils.parametrize`` (``layer.parametrizations.weight.original``) and of the old
    ``weight_norm``/``spectral_norm`` hooks (``weight_v``, ``weight_g``, ``weight_orig``) are owned by the
    parametrized layer, under the tensor's name there; the weight-norm magnitude is marked never centralized.

    Example:
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> owners = owners_of(nn.Sequential(weight_norm(nn.Linear(3, 2))))
        >>> [(o.name, type(o.module).__name__, o.attr, bool(o.never)) for o in owners.values()]  # doctest: +NORMALIZE_WHITESPACE
        [('0.bias', 'ParametrizedLinear', 'bias', False),
         ('0.parametrizations.weight.original0', 'ParametrizedLinear', 'weight', True),
         ('0.parametrizations.weight.original1', 'ParametrizedLinear', 'weight', False)]
    """
    index = OwnerIndex(module)
    owners: dict[nn.Parameter, Owner] = {}
    for sub in module.modules():
        for attr, param in sub.named_parameters(recurse=False):
            if param not in owners:
                owners[param] = index.owner(sub, attr)
    return owners


class OwnerIndex:
    """The user's names of the modules under ``roots``, to name and resolve the owner of any parameter.

    For adapters that see a parameter as (module, attribute) pairs, not as tensors of the tree (FSDP1's
    flat-parameter metadata).
    """

    def __init__(self, *roots: nn.Module) -> None:
        self._names: dict[int, str] = {}
        self._modules: dict[str, nn.Module] = {}
        for root in roots:
            clean = _user_module_names(root)
            for qualified, sub in root.named_modules(remove_duplicate=False):
                name = clean.get(qualified, qualified)
                self._names.setdefault(id(sub), name)
                self._modules.setdefault(name, sub)

    def owner(self, module: nn.Module, attr: str) -> Owner:
        """The :class:`Owner` of ``module.<attr>``: named as the user would, resolved through parametrizations."""
        prefix = self._names.get(id(module), "")
        name = f"{prefix}.{attr}" if prefix else attr
        return _resolved(Owner(name, module, attr), prefix, self._modules)


def user_name(qualified: str) -> str:
    """``qualified`` without the components that wrappers insert (a leading ``module.`` included).

    For names only (no module tree at hand); :func:`owners_of` strips ``module`` only under DDP-like wrappers.

    Example:
        >>> user_name("_forward_module.module._orig_mod.head._fsdp_wrapped_module.weight")
        'head.weight'
    """
    parts = [p for p in qualified.split(".") if p not in WRAPPER_COMPONENTS]
    if len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _user_module_names(root: nn.Module) -> dict[str, str]:
    """Qualified module name -> the user's name of that module."""
    names = {"": ""}

    def walk(module: nn.Module, qualified: str, clean: str) -> None:
        wrapper = type(module).__name__ in _MODULE_WRAPPERS
        for child_name, child in module._modules.items():
            if child is None:
                continue
            child_qualified = f"{qualified}.{child_name}" if qualified else child_name
            if child_qualified in names:
                continue
            dropped = child_name in WRAPPER_COMPONENTS or (wrapper and child_name == "module")
            child_clean = clean if dropped else (f"{clean}.{child_name}" if clean else child_name)
            names[child_qualified] = child_clean
            walk(child, child_qualified, child_clean)

    walk(root, "", "")
    return names


_WEIGHT_NORM_MAGNITUDE = "weight-norm magnitude g (one scale per output unit): GC would zero or distort it"


def _resolved(owner: Owner, module_name: str, modules: dict[str, nn.Module]) -> Owner:
    module, attr = owner.module, owner.attr
    if type(module).__name__ == "ParametrizationList":
        head, _, tensor = module_name.rpartition(".")
        layer_name, _, container = head.rpartition(".")
        layer = modules.get(layer_name)
        if container != "parametrizations" or layer is None:
            return owner
        if attr == "original":
            return Owner(owner.name, layer, tensor)
        if type(module[0]).__name__ == "_WeightNorm":  # type: ignore[index]
            if attr == "original0":
                return Owner(owner.name, layer, tensor, never=_WEIGHT_NORM_MAGNITUDE)
            return Owner(owner.name, layer, tensor)
        return Owner(owner.name, layer, f"{tensor}.{attr}")  # an unknown multi-tensor parametrization: assumed
    for hook in getattr(module, "_forward_pre_hooks", {}).values():
        hooked = getattr(hook, "name", None)
        if not isinstance(hooked, str):
            continue
        kind = type(hook).__name__
        if kind == "WeightNorm" and attr == f"{hooked}_g":
            return Owner(owner.name, module, hooked, never=_WEIGHT_NORM_MAGNITUDE)
        if (kind == "WeightNorm" and attr == f"{hooked}_v") or (kind == "SpectralNorm" and attr == f"{hooked}_orig"):
            return Owner(owner.name, module, hooked)
    return owner


def _assumed_reason(owner: Owner) -> str:
    path = _path(owner.module) if owner.module is not None else ""
    if not path:
        return (
            "owner unknown (bare parameters): dim 0 taken as the output dim; pass the model to use layer types,"
            f" or exclude=[{owner.name!r}]"
        )
    return (
        f"no layout registered for {type(owner.module).__name__}.{owner.attr}: dim 0 taken as the output dim;"
        f" exclude=[{owner.name!r}] or lightning_gc.register_layout({path!r}, {owner.attr!r}, out_dims=...)"
    )


def _type_name(module: nn.Module | None) -> str:
    return type(module).__name__ if module is not None else ""


def _path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_token(attr: str) -> bool:
    return any(fnmatch.fnmatchcase(attr, pattern) for pattern in TOKEN_PARAMETERS)


def _matches_any(module: nn.Module, specs: Sequence[ModuleSpec]) -> bool:
    names = {n for cls in type(module).__mro__ for n in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")}
    return any(isinstance(module, spec) if isinstance(spec, type) else spec in names for spec in specs)


def _spec_name(spec: ModuleSpec) -> str:
    return spec if isinstance(spec, str) else spec.__name__


def _unique(params: Iterable[nn.Parameter]) -> Iterable[nn.Parameter]:
    seen: set[int] = set()
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            yield param
