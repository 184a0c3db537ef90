"""A fused CPU kernel for GC: each gradient read once from memory instead of twice.

Eager PyTorch centralizes a gradient with two operator calls (the row means, then the subtraction), so
every gradient crosses the memory bus twice for reading and once for writing. ``kernel.c`` sums each output
unit and subtracts its mean while the unit is still in cache: one read and one write, the cost of
``torch._foreach_mul_(grads, 1.0)``. It is built with the system's C compiler on first use and cached
(:mod:`lightning_gc.native.build`); where there is no compiler, or with ``LIGHTNING_GC_NATIVE=0``, the
eager route runs with the same results up to summation order. :func:`status` says which one is in use.

Where the interpreter's ``Python.h`` is installed, ``binding.c`` is compiled into the same library: one C
call per step reads every planned ``.grad``, checks it against its job's geometry (type, dtype, shape,
strides, storage span) and runs the kernel, so the per-step Python does not grow with the number of
tensors. Without the header, or with ``LIGHTNING_GC_NATIVE_BINDING=0``, the same checks run in Python and
the kernel is called through ctypes.

Example:
    >>> from lightning_gc import native
    >>> native.status().available in (True, False)
    True
"""

from lightning_gc.native.build import ENV_BINDING, ENV_CACHE, ENV_SWITCH, NativeStatus, kernel, status

__all__ = ["ENV_BINDING", "ENV_CACHE", "ENV_SWITCH", "NativeStatus", "kernel", "status"]
