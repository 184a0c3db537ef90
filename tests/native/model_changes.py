"""Random sequences of model changes between GC calls, checked against a float64 reference after every call.

Run as a script (``python model_changes.py --seed 3 --changes 40``) by ``test_memory_safety.py``, in a
subprocess: a kernel handed memory it does not describe crashes the process or writes garbage, and either
fails the test without killing the suite. The route comes from ``LIGHTNING_GC_NATIVE`` (1: fused kernel,
0: eager routes). Gradients are set by hand, so that any dtype, size and layout can be given; every one has a
non-zero mean along every axis. The reference is written here: ``g - g.mean(over every dim but the output
unit's)`` in float64, per output unit (dim 0; dim 1 for transposed convolutions), and frozen parameters,
biases and parameters without a gradient must come back untouched.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable

import torch
from torch import nn

from lightning_gc import centralize_gradients

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOLERANCE = {
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}


def new_layer(rng: random.Random, dtype: torch.dtype) -> nn.Module:
    kind = rng.choice(["linear", "conv", "conv1d", "transposed"])
    a, b = rng.randint(1, 40), rng.randint(1, 40)
    if kind == "linear":
        layer: nn.Module = nn.Linear(a, b)
    elif kind == "conv":
        layer = nn.Conv2d(a, b, rng.choice([1, 3]))
    elif kind == "conv1d":
        layer = nn.Conv1d(a, b, rng.choice([1, 5]))
    else:
        layer = nn.ConvTranspose2d(a, b, 3)
    return layer.to(dtype)


def offset_tensor(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random entries plus offsets along every axis: any mean over the wrong dims shows."""
    value = torch.randn(shape, generator=generator, dtype=torch.float64)
    for d, size in enumerate(shape):
        offset_shape = [1] * len(shape)
        offset_shape[d] = size
        value = value + 3 * torch.rand(offset_shape, generator=generator, dtype=torch.float64)
    return value.to(dtype)


def in_layout(value: torch.Tensor, layout: str) -> torch.Tensor:
    """``value`` (same entries) stored contiguously, channels_last, transposed or inside a bigger buffer."""
    if layout == "channels_last" and value.ndim == 4:
        return value.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and value.ndim >= 2:
        return value.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "padded" and value.ndim >= 1:
        buffer = torch.zeros((value.shape[0] * 2 + 1, *value.shape[1:]), dtype=value.dtype)
        buffer[1 : 1 + value.shape[0]] = value
        return buffer[1 : 1 + value.shape[0]]
    if layout == "strided" and value.ndim >= 2:
        buffer = torch.zeros((*value.shape[:-1], value.shape[-1] * 2), dtype=value.dtype)
        buffer[..., ::2] = value
        return buffer[..., ::2]
    return value.clone()


class Driver:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = nn.Sequential(*[new_layer(self.rng, torch.float32) for _ in range(self.rng.randint(1, 4))])
        self.log: list[str] = []

    def params(self) -> list[tuple[nn.Module, str, nn.Parameter]]:
        return [(m, n, p) for m in self.model for n, p in m.named_parameters(recurse=False)]

    # ---- the changes
    def cast(self) -> str:
        dtype = self.rng.choice(DTYPES)
        self.model.to(dtype)
        return f"model.to({dtype})"

    def swap_data(self) -> str:
        module, name, param = self.rng.choice(self.params())
        shape = tuple(max(1, s + self.rng.randint(-3, 5)) for s in param.shape)
        param.data = torch.zeros(shape, dtype=self.rng.choice([param.dtype, *DTYPES]))
        return f"{name}.data = zeros{shape} {param.dtype}"

    def add_layer(self) -> str:
        dtype = self.rng.choice(DTYPES)
        self.model.append(new_layer(self.rng, dtype))
        return f"append {type(self.model[-1]).__name__} {dtype}"

    def toggle(self) -> str:
        _, name, param = self.rng.choice(self.params())
        param.requires_grad_(not param.requires_grad)
        return f"{name}.requires_grad = {param.requires_grad}"

    def grad_dtype(self) -> str:
        _, name, param = self.rng.choice(self.params())
        param.grad_dtype = None  # any gradient dtype is then accepted
        return f"{name}.grad_dtype = None"

    def step(self) -> None:
        """Give gradients (some of other dtypes and layouts), centralize, compare with the reference."""
        expected: dict[int, torch.Tensor] = {}
        for module, name, param in self.params():
            if self.rng.random() < 0.1:
                param.grad = None
                continue
            dtype = param.dtype
            if getattr(param, "grad_dtype", param.dtype) is None and self.rng.random() < 0.5:
                dtype = self.rng.choice(DTYPES)
            layout = self.rng.choice(["contiguous", "contiguous", "channels_last", "transposed", "padded", "strided"])
            grad = in_layout(offset_tensor(tuple(param.shape), dtype, self.generator), layout)
            param.grad = grad
            expected[id(param)] = self.reference(module, name, param, grad)
        centralize_gradients(self.model)
        for module, name, param in self.params():
            if param.grad is None:
                continue
            want = expected[id(param)]
            torch.testing.assert_close(
                param.grad.double(), want, **TOLERANCE[param.grad.dtype],
                msg=lambda m, name=name: f"{module}.{name} after {self.log}: {m}",
            )  # fmt: skip

    def reference(self, module: nn.Module, name: str, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach().double().clone()
        if name != "weight" or not param.requires_grad or g.ndim < 2 or g.numel() == 0:
            return g
        out_dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
        dims = tuple(d for d in range(g.ndim) if d != out_dim)
        return g - g.mean(dim=dims, keepdim=True)

    def run(self, changes: int) -> None:
        moves: list[Callable[[], str]] = [self.cast, self.swap_data, self.add_layer, self.toggle, self.grad_dtype]
        self.step()
        for _ in range(changes):
            self.log.append(self.rng.choice(moves)())
            self.step()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument(
        "--float64-rtol", type=float, default=TOLERANCE[torch.float64]["rtol"],
        help="tolerance for float64 gradients (float32 accumulation: 1e-5)",
    )  # fmt: skip
    args = parser.parse_args()
    TOLERANCE[torch.float64] = {"rtol": args.float64_rtol, "atol": args.float64_rtol}
    Driver(args.seed).run(args.changes)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
