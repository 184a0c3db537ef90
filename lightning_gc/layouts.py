"""What an output unit ("row") of a weight is, and which layers store their weights how.

GC subtracts, from each output unit's slice of a weight gradient, that slice's mean. :class:`RowLayout` is
the one definition of an output unit, used by the dense routes, the flat-shard (FSDP1, ZeRO) and the
DTensor code alike: the dims of the *stored* weight that index output units (``out_dims``), and for grouped
transposed convolutions the number of input-channel blocks in dim 0 (``groups``).

Which layout a parameter has is looked up in a registry of :class:`LayerLayout` entries, keyed by the
class path of the owning layer (matched over its MRO, so subclasses inherit; third-party layers are
matched by path without importing their package) and the parameter's name. Every ``torch.nn`` layer with
weights is registered here; ``lightning_gc.third_party_layouts`` adds transformers/timm/torchvision layers,
and :func:`register_layout` lets users add their own. ``out_dims=None`` marks a parameter GC never touches,
with the reason the selection report shows.
"""

from __future__ import annotations

import fnmatch
import importlib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

Mode = Literal["channel", "tensor"]
MODES: tuple[str, ...] = ("channel", "tensor")


@dataclass(frozen=True)
class RowLayout:
    """Where the output units of a weight live, so that GC knows what to average over.

    Args:
        out_dims: the dims of the stored weight that index output units: ``(0,)`` for linear, conv and RNN
            weights; ``(1,)`` for transposed convolutions (``(in, out // groups, *kernel)``) and
            transformers' ``Conv1D`` (``(in, out)``).
        groups: for a grouped transposed convolution, dim 0 holds ``groups`` blocks of input channels and
            each output channel only sees its own block; the mean is taken within the block.

    Raises:
        ValueError: for empty, negative, unsorted or repeated ``out_dims``, ``groups < 1``, or ``groups > 1``
            with dim 0 among the output dims.

    Example:
        >>> RowLayout(out_dims=(1,), groups=2).reduce_dims(ndim=4, mode="channel")
        (1, 3, 4)
        >>> RowLayout(out_dims=(1,)).averaged_dims(ndim=2, mode="channel")
        (0,)
    """

    out_dims: tuple[int, ...] = (0,)
    groups: int = 1

    def __post_init__(self) -> None:
        dims = self.out_dims
        if not dims or any(not isinstance(d, int) or d < 0 for d in dims) or tuple(sorted(set(dims))) != dims:
            raise ValueError(f"`out_dims` must be sorted, distinct dims >= 0, e.g. (0,), got {dims!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"`groups` must be an integer >= 1, got {self.groups!r}")
        if self.groups > 1 and 0 in dims:
            raise ValueError("`groups > 1` splits dim 0 into input-channel blocks: dim 0 cannot be an output dim")

    def fits(self, ndim: int) -> bool:
        """Whether a weight of ``ndim`` dims has these output dims and at least one other dim to average over."""
        return ndim >= 2 and self.out_dims[-1] < ndim and len(self.out_dims) < ndim

    def averaged_dims(self, ndim: int, mode: Mode) -> tuple[int, ...]:
        """The dims of the stored weight that GC averages over (dim 0 within its block for ``groups > 1``)."""
        if mode == "tensor":
            return tuple(range(ndim))
        return tuple(d for d in range(ndim) if d not in self.out_dims)

    def output_units(self, shape: Sequence[int], mode: Mode) -> int:
        """How many means GC takes: one per output unit (per block for ``groups > 1``), one in tensor mode."""
        if mode == "tensor":
            return 1
        total = self.groups
        for d in self.out_dims:
            total *= shape[d]
        return total

    def entries_per_unit(self, shape: Sequence[int], mode: Mode) -> int:
        """How many entries one mean is taken over."""
        total = 1
        for d in self.averaged_dims(len(shape), mode):
            total *= shape[d]
        return total if mode == "tensor" else total // self.groups

    def reduce_dims(self, ndim: int, mode: Mode) -> tuple[int, ...]:
        """The dims to average over, for a tensor of ``ndim`` dims viewed through :meth:`view`."""
        if mode == "tensor":
            return tuple(range(ndim + (1 if self.groups > 1 else 0)))
        if self.groups == 1:
            return self.averaged_dims(ndim, mode)
        keep = {0} | {d + 1 for d in self.out_dims}
        return tuple(d for d in range(ndim + 1) if d not in keep)

    def unit_dim(self, mode: Mode) -> int | None:
        """A dim of :meth:`view` that indexes output units (blocks are cut along it); ``None`` in tensor mode."""
        if mode == "tensor":
            return None
        return self.out_dims[0] + 1 if self.groups > 1 else self.out_dims[0]

    def view(self, tensor: Tensor) -> Tensor:
        """``tensor`` itself, or (grouped transposed conv) with dim 0 split into ``(groups, in // groups)``.

        Splitting one dim is always a view, whatever the strides, so in-place work on it reaches ``tensor``.
        """
        return torch.unflatten(tensor, 0, (self.groups, -1)) if self.groups > 1 else tensor


DIM0 = RowLayout()


@dataclass(frozen=True)
class LayerLayout:
    """One registry entry: how the layer at ``class_path`` stores the parameter(s) ``param``.

    Args:
        class_path: ``"package.module.Class"`` of the layer; subclasses match too.
        param: the parameter's attribute name on the layer, or an ``fnmatch`` pattern (``"weight_*_l*"``).
        out_dims: the dims that index output units, or ``None``: GC never touches this parameter.
        groups_attr: the layer attribute holding the number of input-channel blocks in dim 0 (grouped
            transposed convolutions: ``"groups"``).
        reason: why (shown in the selection report; expected for ``out_dims=None``).

    Example:
        >>> LayerLayout("transformers.pytorch_utils.Conv1D", "weight", out_dims=(1,)).out_dims
        (1,)
    """

    class_path: str
    param: str
    out_dims: tuple[int, ...] | None
    groups_attr: str | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.class_path, str) or "." not in self.class_path:
            raise ValueError(f"`layer` must be a class or a class path 'package.module.Class', got {self.class_path!r}")
        if not isinstance(self.param, str) or not self.param:
            raise ValueError(f"`param` must be a parameter name or an fnmatch pattern, got {self.param!r}")
        if self.out_dims is not None:
            RowLayout(self.out_dims)  # validates
        if self.groups_attr is not None and (not isinstance(self.groups_attr, str) or not self.groups_attr):
            raise ValueError(f"`groups_attr` must be an attribute name or None, got {self.groups_attr!r}")
        if not isinstance(self.reason, str):
            raise ValueError(f"`reason` must be a string, got {self.reason!r}")

    def layout_for(self, layer: nn.Module) -> RowLayout | None:
        """The :class:`RowLayout` of this parameter on ``layer`` (``None``: never centralized)."""
        if self.out_dims is None:
            return None
        groups = int(getattr(layer, self.groups_attr, 1)) if self.groups_attr else 1
        return RowLayout(self.out_dims, groups)


def class_path(cls: type) -> str:
    """``"module.QualName"`` of ``cls``, the key layouts are registered under.

    Example:
        >>> class_path(nn.Linear)
        'torch.nn.modules.linear.Linear'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


_NEVER_NORM = "a normalization scale/shift, not a neuron weight"
_NEVER_TOKENS = "learned key/value bias tokens, not neuron weights"

BUILTIN_LAYOUTS: tuple[LayerLayout, ...] = (
    *(
        LayerLayout(class_path(cls), "weight", (0,), reason="stored (out, in, ...)")
        for cls in (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    ),
    *(
        LayerLayout(class_path(cls), "weight", (1,), groups_attr="groups", reason="stored (in, out // groups, ...)")
        for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    ),
    LayerLayout(class_path(nn.RNNBase), "weight_*", (0,), reason="stored (gates * hidden, in)"),
    LayerLayout(class_path(nn.RNNCellBase), "weight_*", (0,), reason="stored (gates * hidden, in)"),
    LayerLayout(class_path(nn.MultiheadAttention), "*_proj_weight", (0,), reason="stored (out, in)"),
    LayerLayout(class_path(nn.MultiheadAttention), "bias_[kv]", None, reason=_NEVER_TOKENS),
    LayerLayout(class_path(nn.Embedding), "weight", (0,), reason="one row per token"),
    LayerLayout(class_path(nn.EmbeddingBag), "weight", (0,), reason="one row per token"),
    *(LayerLayout(class_path(cls), "*", None, reason=_NEVER_NORM) for cls in (nn.LayerNorm, nn.GroupNorm)),
    *((LayerLayout(class_path(nn.RMSNorm), "*", None, reason=_NEVER_NORM),) if hasattr(nn, "RMSNorm") else ()),
    LayerLayout("transformers.pytorch_utils.Conv1D", "weight", (1,), reason="stored (in, out)"),
)
"""Every ``torch.nn`` layer with weights (Lazy variants and parametrized layers are subclasses), and
transformers' ``Conv1D`` (GPT-2), so that GPT-2 is right with or without the third-party table."""


class LayoutRegistry:
    """Layouts by class path and parameter name; later registrations take precedence.

    Args:
        entries: the first entries (the built-in ones).
        deferred: returns more entries, read on the first lookup and placed before any added since (so users'
            registrations win); for the third-party table, which imports this module.

    Example:
        >>> registry = LayoutRegistry(BUILTIN_LAYOUTS)
        >>> registry.lookup(nn.ConvTranspose2d(4, 6, 3, groups=2), "weight")
        RowLayout(out_dims=(1,), groups=2)
    """

    def __init__(
        self, entries: Iterable[LayerLayout] = (), deferred: Callable[[], Iterable[LayerLayout]] | None = None
    ) -> None:
        self._entries: list[LayerLayout] = [_canonical(e) for e in entries]
        self._deferred = deferred
        self._base = len(self._entries)
        self._cache: dict[tuple[type, str], LayerLayout | None] = {}

    def add(self, entry: LayerLayout) -> None:
        """Register ``entry``, over any earlier entry for the same class and parameter.

        Adding an entry again moves it last instead of growing the registry (a callback built many times).
        """
        canonical = _canonical(entry)
        added = self._entries[self._base :]
        if canonical in added:
            del self._entries[self._base + added.index(canonical)]
        self._entries.append(canonical)
        self._cache.clear()

    def remove(self, entry: LayerLayout) -> None:
        """Forget ``entry`` (the last registration equal to it)."""
        canonical = _canonical(entry)
        for index in range(len(self._entries) - 1, -1, -1):
            if self._entries[index] == canonical:
                del self._entries[index]
                self._base -= 1 if index < self._base else 0
                break
        self._cache.clear()

    def __len__(self) -> int:
        """Entries registered so far (the third-party table counts once it is read)."""
        return len(self._entries)

    def entry(self, layer: nn.Module, param: str) -> LayerLayout | None:
        """The entry for ``layer.<param>``: the most derived class in ``layer``'s MRO that has one."""
        key = (type(layer), param)
        if key not in self._cache:
            self._cache[key] = self._find(type(layer), param)
        return self._cache[key]

    def lookup(self, layer: nn.Module, param: str) -> RowLayout | None:
        """The layout of ``layer.<param>``; ``None`` if unregistered or registered as never centralized."""
        entry = self.entry(layer, param)
        return entry.layout_for(layer) if entry is not None else None

    def _find(self, cls: type, param: str) -> LayerLayout | None:
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self._entries[self._base : self._base] = [_canonical(e) for e in deferred()]
        for base in cls.__mro__:
            path = class_path(base)
            for entry in reversed(self._entries):
                if entry.class_path == path and fnmatch.fnmatchcase(param, entry.param):
                    return entry
        return None


def _canonical(entry: LayerLayout) -> LayerLayout:
    """``entry`` with its class path as the class defines it, where the module is already imported.

    ``"torch.nn.Linear"`` names the class that ``torch.nn.modules.linear`` defines; matching is by the
    defining path, so a public alias is resolved here, never by importing a package.
    """
    module_name, _, name = entry.class_path.rpartition(".")
    module = sys.modules.get(module_name)
    cls = getattr(module, name, None) if module is not None else None
    if isinstance(cls, type) and class_path(cls) != entry.class_path:
        return LayerLayout(class_path(cls), entry.param, entry.out_dims, entry.groups_attr, entry.reason)
    return entry


def _third_party() -> tuple[LayerLayout, ...]:
    try:
        module = importlib.import_module("lightning_gc.third_party_layouts")
    except ModuleNotFoundError as error:
        if error.name != "lightning_gc.third_party_layouts":
            raise
        return ()
    return tuple(module.THIRD_PARTY_LAYOUTS)


REGISTRY = LayoutRegistry(BUILTIN_LAYOUTS, deferred=_third_party)
"""The registry every selection reads (the third-party table is loaded on the first lookup)."""


def register_layout(
    layer: type | str,
    param: str = "weight",
    out_dims: Sequence[int] | int | None = (0,),
    *,
    groups_attr: str | None = None,
    reason: str = "",
) -> LayerLayout:
    """Tell GC where the output units of ``layer.<param>`` are (or, with ``out_dims=None``, to leave it alone).

    Args:
        layer: the layer class, or its path ``"package.module.Class"`` (nothing is imported); subclasses match.
        param: the parameter's attribute name on the layer, or an ``fnmatch`` pattern.
        out_dims: the dims of the stored weight that index output units; ``None``: never centralize.
        groups_attr: the layer attribute with the number of input-channel blocks in dim 0, if any.
        reason: shown in the selection report.

    Returns:
        The registered entry (pass it to :func:`unregister_layout` to undo).

    Raises:
        ValueError: naming the argument, for an invalid one.

    Example:
        >>> class MyDense(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.kernel = nn.Parameter(torch.zeros(3, 5))  # stored (in, out)
        >>> import torch
        >>> entry = register_layout(MyDense, "kernel", out_dims=(1,), reason="stored (in, out)")
        >>> REGISTRY.lookup(MyDense(), "kernel")
        RowLayout(out_dims=(1,), groups=1)
        >>> unregister_layout(entry)
    """
    entry = layer_layout(layer, param, out_dims, groups_attr=groups_attr, reason=reason)
    REGISTRY.add(entry)
    return entry


def unregister_layout(entry: LayerLayout) -> None:
    """Undo :func:`register_layout`."""
    REGISTRY.remove(entry)


def layer_layout(
    layer: type | str,
    param: str = "weight",
    out_dims: Sequence[int] | int | None = (0,),
    *,
    groups_attr: str | None = None,
    reason: str = "",
) -> LayerLayout:
    """A validated :class:`LayerLayout` from user input (a class or path; ``out_dims`` as int, list or None)."""
    if isinstance(layer, type):
        if not issubclass(layer, nn.Module):
            raise ValueError(f"`layer` must be an nn.Module subclass or a class path, got {layer!r}")
        path = class_path(layer)
    else:
        path = layer
    dims: tuple[int, ...] | None
    if out_dims is None:
        dims = None
    elif isinstance(out_dims, int) and not isinstance(out_dims, bool):
        dims = (out_dims,)
    elif isinstance(out_dims, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in out_dims):
        dims = tuple(out_dims)
    else:
        raise ValueError(f"`out_dims` must be a dim, a list of dims or None, got {out_dims!r}")
    return LayerLayout(path, param, dims, groups_attr, reason)


LAYOUT_SPEC_KEYS = ("layer", "param", "out_dims", "groups_attr", "reason")


def layouts_from_specs(
    specs: Iterable[Mapping[str, Any] | LayerLayout], argument: str = "layouts"
) -> tuple[LayerLayout, ...]:
    """Entries from config-file specs ``{"layer": "pkg.Mod", "param": "w", "out_dims": [1]}`` (LightningCLI).

    Raises:
        ValueError: naming ``argument``, for a spec that is not a mapping with those keys, or an invalid value.

    Example:
        >>> layouts_from_specs([{"layer": "my.pkg.Dense", "param": "kernel", "out_dims": [1]}])[0].out_dims
        (1,)
    """
    if isinstance(specs, (str, Mapping, LayerLayout)):
        specs = [specs]
    entries = []
    for spec in specs:
        if isinstance(spec, LayerLayout):
            entries.append(spec)
            continue
        if not isinstance(spec, Mapping) or "layer" not in spec or set(spec) - set(LAYOUT_SPEC_KEYS):
            raise ValueError(
                f"`{argument}` entries are mappings with keys {LAYOUT_SPEC_KEYS} ('layer' required), e.g."
                f" {{'layer': 'pkg.module.Class', 'param': 'weight', 'out_dims': [1]}}; got {spec!r}"
            )
        try:
            entries.append(layer_layout(**spec))
        except ValueError as error:
            raise ValueError(f"`{argument}`: {error}") from None
    return tuple(entries)
