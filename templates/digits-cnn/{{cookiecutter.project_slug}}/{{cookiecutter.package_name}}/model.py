"""A small CNN for 28x28 digits as a LightningModule, with the metrics the comparison reads."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from {{ cookiecutter.package_name }}.plots import confusion_matrix_figure

NUM_CLASSES = 10
# `norm`: what follows each convolution before its ReLU.
NORMS = ("none", "batch", "group")
# GroupNorm's groups: at most this many, the largest count that divides the channels.
MAX_GROUPS = 8


class DigitsCNN(pl.LightningModule):
    """Two 5x5 convolutions with max-pooling, then two linear layers; trained with SGD and momentum.

    No normalisation by default (``norm="none"``): the template shows what GC alone does to the gradients.
    The paper's results are all on networks with BatchNorm or GroupNorm; ``norm="batch"`` or ``"group"``
    puts one after each convolution, so that a learning-rate sweep can show whether GC's effect on the
    stable range depends on it.

    Args:
        lr: SGD learning rate.
        momentum: SGD momentum, in [0, 1).
        weight_decay: SGD (coupled) weight decay, >= 0.
        channels: output channels of the two convolutions.
        hidden: width of the hidden linear layer.
        norm: ``"none"``, ``"batch"`` (``BatchNorm2d``) or ``"group"`` (``GroupNorm`` with up to 8 groups)
            after each convolution.

    Raises:
        ValueError: for an invalid argument, naming it and the accepted values.

    Example:
        >>> model = DigitsCNN()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        norm: str = "none",
    ) -> None:
        super().__init__()
        _check(isinstance(lr, (int, float)) and lr > 0, "lr", "a number > 0", lr)
        _check(isinstance(momentum, (int, float)) and 0 <= momentum < 1, "momentum", "a number in [0, 1)", momentum)
        _check(isinstance(weight_decay, (int, float)) and weight_decay >= 0, "weight_decay", "a number >= 0", weight_decay)
        channels = tuple(channels)
        _check(len(channels) == 2 and all(isinstance(c, int) and c > 0 for c in channels), "channels",
               "two positive integers", channels)
        _check(isinstance(hidden, int) and hidden > 0, "hidden", "a positive integer", hidden)
        _check(norm in NORMS, "norm", f"one of {NORMS}", norm)
        self.save_hyperparameters()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 5), *_norm(norm, c1), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 24 -> 12
            nn.Conv2d(c1, c2, 5), *_norm(norm, c2), nn.ReLU(), nn.MaxPool2d(2),  # 12 -> 8 -> 4
            nn.Flatten(), nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES),
        )
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_metrics = _eval_metrics()
        self.test_metrics = _eval_metrics()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_metrics)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # Runs after the GC callback's hook, so in the GC arm this is the norm the optimizer sees.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0.0
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), prog_bar=stage == "val", sync_dist=True)
        metrics.update(logits, y)

    def _eval_epoch_end(self, stage: str, metrics: MetricCollection) -> None:
        values = metrics.compute()  # a collective under DDP: every rank computes, every rank gets the totals
        metrics.reset()
        if self.trainer.sanity_checking:
            return
        # Already reduced by torchmetrics, so equal on every rank: sync_dist only averages equal values, and
        # tells Lightning that they are global.
        self.log(f"{stage}/acc", values["acc"], prog_bar=True, sync_dist=True)
        self.log_dict({f"{stage}/acc_class_{k}": acc for k, acc in enumerate(values["acc_class"])}, sync_dist=True)
        logger = self.logger
        if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
            figure = confusion_matrix_figure(values["confusion"].cpu(), title=f"{stage} confusion, epoch {self.current_epoch}")
            logger.experiment.add_figure(f"{stage}/confusion_matrix", figure, global_step=self.global_step)


def _norm(norm: str, channels: int) -> list[nn.Module]:
    """The layer after a convolution of ``channels`` outputs; none for ``"none"``, so that network is unchanged."""
    if norm == "batch":
        return [nn.BatchNorm2d(channels)]
    if norm == "group":
        return [nn.GroupNorm(max(g for g in range(1, MAX_GROUPS + 1) if channels % g == 0), channels)]
    return []


def _eval_metrics() -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(NUM_CLASSES, average="micro"),
            "acc_class": MulticlassAccuracy(NUM_CLASSES, average=None),
            "confusion": MulticlassConfusionMatrix(NUM_CLASSES),
        },
        compute_groups=False,
    )


def _check(ok: bool, name: str, accepted: str, value: object) -> None:
    if not ok:
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")
