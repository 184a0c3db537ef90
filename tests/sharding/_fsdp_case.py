"""The model, data and float64 reference shared by the FSDP/DeepSpeed workers and their tests.

Every weight has an odd number of rows, so flat shards cut rows; transposed convolutions (one grouped)
and a GPT-2-style ``Conv1D`` (weight stored ``(in, out)``) put output units in dim 1, so their rows
interleave in the flat layout; a ``weight_norm``-parametrized linear layer has a direction centralized like
its layer and a magnitude that GC never touches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

WORLD = 2
MICRO_BATCH = 3
ACCUMULATE = 2
STEPS = 2
LR = 0.5


class Conv1D(nn.Module):
    """A stand-in named like ``transformers.pytorch_utils.Conv1D`` (GPT-2): weight stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"


class Net(nn.Module):
    """A small conv/transposed-conv/linear stack; ``layers`` names its parameters' owners."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3)
        self.up = nn.ConvTranspose1d(5, 6, 3)
        self.gup = nn.ConvTranspose1d(6, 9, 2, groups=3)
        self.fc1 = nn.Linear(9, 15)
        self.fc2 = nn.Linear(15, 13)
        self.c1d = Conv1D(11, 13)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(11, 7))
        self.head = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.gup(torch.tanh(self.up(torch.tanh(self.conv(x))))))
        h = torch.tanh(self.c1d(torch.tanh(self.fc2(torch.tanh(self.fc1(h.mean(dim=-1)))))))
        return self.head(torch.tanh(self.wn(h)))


class Holder(nn.Module):
    """``Net`` under the attribute ``net``, so parameter names match the Lightning module's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def make_net(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def data() -> tuple[Tensor, Tensor]:
    """Inputs and targets for every (step, micro-batch, rank): ``[STEPS, ACCUMULATE, WORLD, MICRO_BATCH, ...]``."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, ACCUMULATE, WORLD, MICRO_BATCH, 3, 9, generator=g)
    y = torch.randn(STEPS, ACCUMULATE, WORLD, MICRO_BATCH, 3, generator=g)
    return x, y


def rank_batches(rank: int) -> list[tuple[Tensor, Tensor]]:
    """The micro-batches rank ``rank`` trains on, in order."""
    x, y = data()
    return [(x[s, m, rank], y[s, m, rank]) for s in range(STEPS) for m in range(ACCUMULATE)]


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).square().mean()


# ---- independent float64 reference ---------------------------------------------------------------------


def gc_reference(name: str, g: Tensor, module: nn.Module, mode: str) -> Tensor:
    """The paper's GC of one weight gradient, written out per layer type (not lightning_gc's code)."""
    if is_magnitude(name):
        return g
    if mode == "tensor":
        return g - g.mean()
    if type(module).__name__ == "Conv1D":  # weight (in, out): one mean per output column
        return g - g.mean(dim=0, keepdim=True)
    if isinstance(module, nn.ConvTranspose1d):  # weight (in, out // groups, k): one mean per output channel
        groups = module.groups
        v = g.reshape(groups, g.shape[0] // groups, g.shape[1], g.shape[2])
        return (v - v.mean(dim=(1, 3), keepdim=True)).reshape(g.shape)
    return g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True)


def is_magnitude(name: str) -> bool:
    """The weight-norm magnitude ``g``: GC never touches it."""
    return name.endswith("parametrizations.weight.original0")


def reference_run(
    mode: str = "channel",
    exclude: tuple[str, ...] = (),
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    gc: bool = True,
    grad_factor: float = 1.0,
) -> tuple[dict[str, Tensor], list[dict[str, float]]]:
    """Train in float64 on the union of all ranks' batches; return final params and per-step GC stats.

    GC is applied to ``g + weight_decay * w`` (the paper's SGD_GC), and the optimizer then adds the decay
    itself, as under ``centralize_weight_decay=True``. ``grad_factor`` scales the gradient first (Lightning
    divides the loss by ``accumulate_grad_batches`` and DeepSpeed divides it again).
    """
    net = make_net(torch.float64)
    opt = make_optimizer(net.parameters(), optimizer, weight_decay)
    x, y = data()
    owners = {f"{m}.{a}": mod for m, mod in net.named_modules() for a, _ in mod.named_parameters(recurse=False)}
    stats = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(net(x[step].reshape(-1, 3, 9).double()), y[step].reshape(-1, 3).double())
        (loss * grad_factor).backward()
        grad_sq = removed_sq = 0.0
        for name, p in net.named_parameters():
            if p.ndim < 2 or name in exclude or not gc or is_magnitude(name):
                continue
            module = owners[name]
            grad_sq += p.grad.square().sum().item()
            removed_sq += (p.grad - gc_reference(name, p.grad, module, mode)).square().sum().item()
            decayed = p.grad + weight_decay * p.detach()
            p.grad = gc_reference(name, decayed, module, mode) - weight_decay * p.detach()
        stats.append(
            {"grad_norm": math.sqrt(grad_sq), "removed_norm_ratio": math.sqrt(removed_sq / grad_sq) if gc else 0.0}
        )
        opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}, stats


def make_optimizer(params, kind: str, weight_decay: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, weight_decay=weight_decay)
    if kind == "sgd_groups":  # the same hyper-parameters in two groups: [conv, up] and the rest
        params = list(params)
        return torch.optim.SGD([{"params": params[:4]}, {"params": params[4:]}], lr=LR, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.01, weight_decay=weight_decay)
    raise ValueError(kind)


def owners() -> dict[str, nn.Module]:
    net = Net()
    return {f"{m}.{a}": mod for m, mod in net.named_modules() for a, _ in mod.named_parameters(recurse=False)}
