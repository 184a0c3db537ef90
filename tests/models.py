"""Small models and data shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Conv, transposed conv (grouped) and linear layers, with odd sizes so nothing divides evenly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3)
        self.up = nn.ConvTranspose2d(5, 4, 2, groups=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(self.up(x))
        return self.head(self.pool(x).flatten(1))


def make_batches(n_batches: int, batch_size: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 1, 7, 7, generator=generator), torch.randint(0, 3, (batch_size,), generator=generator))
        for _ in range(n_batches)
    ]


LAYOUTS = {"conv.weight": (0, 1), "up.weight": (1, 1), "head.weight": (0, 1)}
"""Output dim and groups of each centralized parameter of :class:`TinyConvNet`."""


def _lightning():
    import lightning.pytorch as pl

    return pl


class GradRecorder(_lightning().Callback):
    """Records every gradient seen at `on_before_optimizer_step` (put it before or after GC in the list)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.seen.append(
            {n: p.grad.detach().double().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        )


class TinyModule(_lightning().LightningModule):
    """TinyConvNet trained with cross-entropy on fixed batches; the optimizer is a constructor argument."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, weight_decay: float = 0.0, **optimizer_kwargs) -> None:
        super().__init__()
        self.net = TinyConvNet()
        self.optimizer_name, self.lr, self.weight_decay, self.optimizer_kwargs = (
            optimizer,
            lr,
            weight_decay,
            optimizer_kwargs,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "lbfgs": torch.optim.LBFGS}
        kwargs = dict(self.optimizer_kwargs, lr=self.lr)
        if self.optimizer_name != "lbfgs":
            kwargs["weight_decay"] = self.weight_decay
        return cls[self.optimizer_name](self.parameters(), **kwargs)


def loader(batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """A DataLoader yielding exactly `batches` in order."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def trainer(**kwargs):
    pl = _lightning()
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def reference_sgd(
    initial_state: dict[str, torch.Tensor],
    steps: list[list[tuple[torch.Tensor, torch.Tensor]]],
    lr: float,
    momentum: float = 0.0,
    gc: bool = True,
) -> dict[str, torch.Tensor]:
    """Float64 SGD written out by hand: each step averages the gradients of its batches, GC, then momentum."""
    from reference import gc_reference

    model = TinyConvNet().double()
    model.load_state_dict({k: v.double() for k, v in initial_state.items()})
    buffers: dict[str, torch.Tensor] = {}
    for batches in steps:
        model.zero_grad()
        for x, y in batches:
            (nn.functional.cross_entropy(model(x.double()), y) / len(batches)).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = p.grad
                if gc and name in LAYOUTS:
                    g = gc_reference(g, *LAYOUTS[name])
                buffers[name] = g if name not in buffers else momentum * buffers[name] + g
                p -= lr * buffers[name]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def net_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The TinyConvNet state of a TinyModule (or of the net itself), detached, float64."""
    net = getattr(module, "net", module)
    return {k: v.detach().double().clone() for k, v in net.state_dict().items()}
