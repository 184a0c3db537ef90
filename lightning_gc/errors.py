"""The errors lightning-gc raises and the one way it warns.

Lowest layer of the package: every other module may import it, it imports nothing of theirs.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import Tensor


class _NamedParameter(Protocol):  # a selection.Target, without importing that higher layer
    @property
    def name(self) -> str: ...

    @property
    def param(self) -> Tensor: ...


class UnsupportedGradientLayoutError(RuntimeError):
    """GC was asked to centralize a gradient whose layout it does not handle.

    Example:
        >>> issubclass(UnsupportedGradientLayoutError, RuntimeError)
        True
    """


def check_dense_gradient(target: _NamedParameter, grad: Tensor, strategy_name: str = "") -> None:
    """Raise unless ``grad`` is a plain tensor of ``target.param``'s logical shape: the guard of the dense routes.

    Raises:
        UnsupportedGradientLayoutError: for DTensor gradients, flattened shards and any other shape mismatch.
    """
    if type(grad).__name__ == "DTensor" or grad.shape != target.param.shape:
        where = f" under {strategy_name}" if strategy_name else ""
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization cannot centralize `{target.name}`{where}: its gradient is a"
            f" {type(grad).__name__} of shape {tuple(grad.shape)}, but the parameter's logical shape is"
            f" {tuple(target.param.shape)}. Centralizing a shard would be silently wrong."
        )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str) -> None:
    """``warnings.warn`` on the user's line: the first frame outside ``lightning_gc``.

    Plans are built lazily, at varying depths, so no fixed ``stacklevel`` fits
    (``warnings.warn(skip_file_prefixes=...)`` does this on Python 3.12+ only).
    """
    warnings.warn(message, UserWarning, stacklevel=_stacklevel_outside_package())


def _stacklevel_outside_package() -> int:
    frame = sys._getframe(2)  # the caller of `warn`; level 1 is `warn` itself
    level = 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
