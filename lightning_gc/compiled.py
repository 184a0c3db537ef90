"""The optional ``torch.compile`` route: every gradient's mean and subtraction fused into one kernel.

Eager GC reads each gradient twice (once for the means, once to subtract). Inductor turns the same code
into one kernel per tensor that reduces an output unit and subtracts its mean while the unit is still in
L1, and runs all tensors from one compiled graph: close to one read-and-write pass, and on GPUs a number
of launches that does not grow with two per tensor.

It is opt-in (compiling takes seconds to a minute, once per set of gradient layouts) and never required:
when compilation fails (no C++ compiler, an unsupported platform) a warning says so once and the eager
routes take over; after ``max_variants`` distinct layouts (shapes, strides, dtypes) it stops compiling new
ones, so a model whose gradients change layout every step does not recompile every step.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from lightning_gc.centralize import removed_sq_norm
from lightning_gc.errors import warn as warn_user

Spec = tuple[tuple[int, ...], int]
"""Per tensor: the dims to average over (on the grouped view) and the transposed-conv ``groups``."""


def centralize_all_(grads: list[Tensor], specs: tuple[Spec, ...]) -> Tensor:
    """Centralize ``grads`` in place; return the squared norm of everything removed (float32).

    Written for the compiler: as eager code it materializes float32 copies of half-precision tensors.
    """
    removed = []
    for grad, (dims, groups) in zip(grads, specs):
        viewed = torch.unflatten(grad, 0, (groups, -1)) if groups > 1 else grad
        values = viewed.float() if viewed.dtype in (torch.float16, torch.bfloat16) else viewed
        mean = values.mean(dim=dims, keepdim=True)
        viewed.copy_(values - mean)
        removed.append(removed_sq_norm(mean, values.numel()))
    return torch.stack(removed).sum()


class CompiledCentralizer:
    """Calls a compiled :func:`centralize_all_`, or declines (returns ``None``) so the caller runs eagerly.

    Args:
        warn: reports, once, that compilation is unavailable.
        backend: the ``torch.compile`` backend (``"inductor"``; tests use cheaper ones).
        max_variants: distinct gradient layouts this instance compiles before declining new ones; kept below
            dynamo's recompile limit (8 per code object), past which dynamo would silently run the function
            eagerly, with float32 copies of half-precision gradients.
    """

    def __init__(
        self, warn: Callable[[str], None] = warn_user, backend: str = "inductor", max_variants: int = 2
    ) -> None:
        self._warn = warn
        self.backend = backend
        self.max_variants = max_variants
        self.variants: set[Hashable] = set()
        self.unavailable = False
        self._fn: Any = None

    def __call__(self, grads: list[Tensor], specs: tuple[Spec, ...]) -> Tensor | None:
        """Centralize ``grads`` and return the removed squared norm, or ``None`` without touching them."""
        if self.unavailable:
            return None
        key = (specs, tuple((g.shape, g.stride(), g.dtype, g.device) for g in grads))
        if key not in self.variants:
            if len(self.variants) >= self.max_variants:
                return None
            self.variants.add(key)
        try:
            if self._fn is None:
                fn = _own_copy(centralize_all_)
                self._fn = torch.compile(fn, backend=self.backend, fullgraph=True, dynamic=False)
            result: Tensor = self._fn(grads, specs)
            return result
        except Exception as error:
            # Compilation happens before the graph runs, so the gradients are untouched here.
            self.unavailable = True
            self._warn(
                "lightning-gc: torch.compile is unavailable here, using the eager implementation"
                f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            )
            return None


def compile_backend(compile: bool | str) -> str:
    """The ``torch.compile`` backend that ``compile=`` names: ``"inductor"`` for ``True``.

    Raises:
        ValueError: for anything but ``True`` or a registered backend name.

    Example:
        >>> compile_backend(True)
        'inductor'
    """
    if compile is True:
        return "inductor"
    backends = torch._dynamo.list_backends(exclude_tags=())
    if isinstance(compile, str) and compile in backends:
        return compile
    raise ValueError(f"`compile` must be True, False or a torch.compile backend name {backends}, got {compile!r}")


def _own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own code object: dynamo counts recompiles per code object, so each instance gets its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
