"""A fused CPU kernel for GC: each gradient read once from memory instead of twice.

Eager PyTorch centralizes a gradient with two operator calls (the row means, then the subtraction), so
every gradient crosses the memory bus twice for reading and once for writing. ``kernel.c`` sums each output
unit and subtracts its mean while the unit is still in cache: one read and one write, the cost of
``torch._foreach_mul_(grads, 1.0)``. It is built with the system's C compiler on first use and cached
(:mod:`lightning_gc.native.build`); where there is no compiler, or with ``LIGHTNING_GC_NATIVE=0``, the
eager route runs with the same results up to summation order. :func:`status` says which one is in use.

Example:
    >>> from lightning_gc import native
    >>> native.status().available in (True, False)
    True
"""

from lightning_gc.native.build import ENV_BINDING, ENV_CACHE, ENV_SWITCH, NativeStatus, kernel, status

__all__ = ["ENV_BINDING", "ENV_CACHE", "ENV_SWITCH", "NativeStatus", "kernel", "status"]
