"""Gradient Centralization for PyTorch Lightning.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_gc import GradientCentralization as GradientCentralization
    >>> trainer = Trainer(callbacks=[GradientCentralization()], logger=False)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names of _EXPORTS, for type checkers and IDEs
    from lightning_gc.callback import GradientCentralization as GradientCentralization
    from lightning_gc.config import GCConfig as GCConfig
    from lightning_gc.diagnostics import GCStats as GCStats
    from lightning_gc.errors import UnsupportedGradientLayoutError as UnsupportedGradientLayoutError
    from lightning_gc.functional import centralize_gradients as centralize_gradients
    from lightning_gc.layouts import LayerLayout as LayerLayout
    from lightning_gc.layouts import RowLayout as RowLayout
    from lightning_gc.layouts import register_layout as register_layout
    from lightning_gc.selection import select as select
    from lightning_gc.selection_report import SelectionReport as SelectionReport
    from lightning_gc.selection_report import describe as describe

# Imported on first use (PEP 562): the `lightning-gc` command (e.g. `new --list`) then starts without
# importing torch and Lightning, which takes seconds.
_EXPORTS = {
    "GCConfig": "lightning_gc.config",
    "GCStats": "lightning_gc.diagnostics",
    "GradientCentralization": "lightning_gc.callback",
    "LayerLayout": "lightning_gc.layouts",
    "RowLayout": "lightning_gc.layouts",
    "SelectionReport": "lightning_gc.selection_report",
    "UnsupportedGradientLayoutError": "lightning_gc.errors",
    "centralize_gradients": "lightning_gc.functional",
    "describe": "lightning_gc.selection_report",
    "register_layout": "lightning_gc.layouts",
    "select": "lightning_gc.selection",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_gc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
