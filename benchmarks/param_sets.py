"""Parameter sets shaped like real models, built from their architecture rules (no torchvision needed)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

Shapes = list[tuple[int, ...]]


def resnet50_shapes() -> Shapes:
    """The 161 parameter shapes of torchvision's ``resnet50()``, in ``named_parameters`` order (25,557,032)."""
    shapes: Shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for index in range(blocks):
            out = width * 4
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if index == 0:  # the projection shortcut
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    return shapes + [(1000, 2048), (1000,)]


def gpt2_small_shapes(vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12) -> Shapes:
    """GPT-2 small (124,439,808 parameters, 148 tensors); linear weights as ``(out, in)`` like ``nn.Linear``."""
    shapes: Shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def many_small_shapes(count: int = 2000, side: int = 64) -> Shapes:
    """``count`` tensors of ``side x side``: a model that is all per-tensor overhead."""
    return [(side, side)] * count


PARAM_SETS: dict[str, Callable[[], Shapes]] = {
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
    "many-small": many_small_shapes,
}


def tiny_shapes() -> Shapes:
    """A few tensors for a smoke run (``--quick``)."""
    return [(8, 3, 3, 3), (8,), (16, 8), (16, 8), (16, 8), (4, 16)]


class ParameterSet(nn.Module):
    """Parameters of the given shapes, with random gradients, held by one module (so plans can be cached)."""

    def __init__(self, shapes: Shapes, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.params = nn.ParameterList()
        for shape in shapes:
            param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            param.grad = (torch.randn(shape, generator=generator) + 0.1).to(dtype=dtype, device=device)
            self.params.append(param)

    def centralized_grads(self) -> list[torch.Tensor]:
        """The gradients GC touches (``ndim >= 2``), the ones every variant is timed on."""
        return [p.grad for p in self.params if p.ndim >= 2]

    def grad_bytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.centralized_grads())


def count_parameters(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)
