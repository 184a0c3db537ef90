"""The errors lightning-gc raises and the one way it warns.

Lowest layer of the package: every other module may import it, it imports nothing of theirs.
"""

from __future__ import annotations

import os
import sys
import warnings


class UnsupportedGradientLayoutError(RuntimeError):
    """GC was asked to centralize a gradient whose layout it does not handle.

    Example:
        >>> issubclass(UnsupportedGradientLayoutError, RuntimeError)
        True
    """


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
