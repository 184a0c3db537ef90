"""What GC would do to each parameter, and why: the selection report.

:func:`describe` runs the same selection as the callback and :func:`~lightning_gc.centralize_gradients`
(:func:`lightning_gc.selection.select`) and returns a :class:`SelectionReport`: one row per parameter with
the decision (``centralized`` along which dims, ``assumed`` (the paper's dim-0 rule where no layer
layout is registered) or ``skipped`` and why). The callback prints its summary at fit start.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_gc.config import GCConfig
from lightning_gc.selection import Choice, Decision, Selection, select

DECISIONS: tuple[Decision, ...] = ("centralized", "assumed", "skipped")
_OPTIONS = {f.name for f in fields(GCConfig)}


@dataclass(frozen=True)
class SelectionReport:
    """One :class:`~lightning_gc.selection.Choice` per parameter; ``str()`` gives a table and a summary.

    Args:
        rows: the decisions, in parameter order (``name``, ``shape``, ``module``, ``decision``, ``dims``,
            ``reason``).
        unmatched_patterns: ``exclude`` patterns that matched no parameter.
        unmatched_modules: ``exclude_modules`` entries that matched no module.
    """

    rows: tuple[Choice, ...]
    unmatched_patterns: tuple[str, ...] = ()
    unmatched_modules: tuple[str, ...] = ()

    @classmethod
    def of(cls, selection: Selection) -> SelectionReport:
        """The report of a selection (a plan's ``.selection``)."""
        return cls(tuple(selection.choices), tuple(selection.unmatched_patterns), tuple(selection.unmatched_modules))

    def counts(self) -> dict[str, tuple[int, int]]:
        """``decision -> (parameters, elements)`` for every decision."""
        out: dict[str, tuple[int, int]] = {d: (0, 0) for d in DECISIONS}
        for row in self.rows:
            params, elements = out[row.decision]
            out[row.decision] = (params + 1, elements + math.prod(row.shape))
        return out

    def by_decision(self, decision: Decision) -> list[Choice]:
        """The rows with ``decision``."""
        return [r for r in self.rows if r.decision == decision]

    def summary(self) -> str:
        """One line of counts per decision, plus what to do about assumed layouts."""
        parts = [f"{params} {d} ({_elements(elements)})" for d, (params, elements) in self.counts().items()]
        text = "GradientCentralization: " + ", ".join(parts)
        if self.by_decision("assumed"):
            text += (
                "; assumed = dim 0 taken as the output dim where no layer layout is registered: check them with"
                " lightning_gc.describe(model), exclude=[...] or lightning_gc.register_layout(...)"
            )
        if self.unmatched_patterns:
            text += f"; `exclude` patterns that matched nothing: {list(self.unmatched_patterns)}"
        if self.unmatched_modules:
            text += f"; `exclude_modules` entries that matched nothing: {list(self.unmatched_modules)}"
        return text

    def table(self) -> str:
        """A fixed-width table, one row per parameter."""
        header = ("name", "shape", "module", "decision", "dims", "reason")
        lines = [header, *(_cells(r) for r in self.rows)]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        out = []
        for line in lines:
            cells = [cell.ljust(width) for cell, width in zip(line, widths)]
            out.append("  ".join([*cells, line[-1]]).rstrip())
        return "\n".join(out)

    def markdown(self) -> str:
        """The table in Markdown (TensorBoard's text plugin renders it), then the summary."""
        lines = ["| name | shape | module | decision | dims | reason |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in self.rows]
        return "\n".join([*lines, "", self.summary()])

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.summary()}"


def describe(
    model_or_params: nn.Module | Iterable[nn.Parameter], optimizer: Optimizer | None = None, **gc_options: Any
) -> SelectionReport:
    """What GC does to each parameter of ``model_or_params`` with these options, and why.

    Args:
        model_or_params: the model (layer types known), or parameters (named ``param_<i>``). Describe a
            sharded model before wrapping it: the report names the user's parameters in their logical shapes.
        optimizer: consider only its parameters.
        gc_options: the options of :class:`~lightning_gc.GradientCentralization` (``conv_only``, ``mode``,
            ``exclude``, ``exclude_modules``, ...), validated the same way.

    Raises:
        ValueError: for an unknown or invalid option, naming it.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
        >>> print(describe(model))
        name      shape    module     decision     dims  reason
        0.weight  (10, 4)  Embedding  skipped            Embedding is in exclude_modules
        1.weight  (3, 4)   Linear     centralized  (1,)  stored (out, in, ...)
        1.bias    (3,)     Linear     skipped            ndim < 2: a bias or scale, no output unit to average within
        <BLANKLINE>
        GradientCentralization: 1 centralized (12), 0 assumed (0), 2 skipped (43)
    """
    unknown = sorted(set(gc_options) - _OPTIONS)
    if unknown:
        raise ValueError(f"describe() got unknown options {unknown}; the options are {sorted(_OPTIONS)}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise ValueError(f"`optimizer` must be a torch.optim.Optimizer or None, got {optimizer!r}")
    return SelectionReport.of(select(model_or_params, GCConfig(**gc_options), optimizer))


def _cells(row: Choice) -> tuple[str, ...]:
    dims = str(row.dims) if row.decision != "skipped" else ""
    reason = row.reason if row.decision != "centralized" or row.reason else ""
    return (row.name, str(row.shape), row.module, row.decision, dims, reason)


def _elements(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
