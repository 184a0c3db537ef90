"""The guard: refuse, loudly, any gradient layout that no adapter handles, instead of centralizing nothing.

Defined in :mod:`lightning_gc.errors` (the dense plan uses it too, and must not import the sharding package).
"""

from lightning_gc.errors import UnsupportedGradientLayoutError, check_dense_gradient

__all__ = ["UnsupportedGradientLayoutError", "check_dense_gradient"]
