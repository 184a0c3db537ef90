"""Gradient Centralization for PyTorch Lightning.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_gc import GradientCentralization
    >>> trainer = Trainer(callbacks=[GradientCentralization()], logger=False)
"""

from lightning_gc.callback import GradientCentralization
from lightning_gc.diagnostics import GCStats
from lightning_gc.functional import centralize_gradients
from lightning_gc.sharding.guard import UnsupportedGradientLayoutError

__all__ = ["GCStats", "GradientCentralization", "UnsupportedGradientLayoutError", "centralize_gradients"]
__version__ = "0.1.0"
