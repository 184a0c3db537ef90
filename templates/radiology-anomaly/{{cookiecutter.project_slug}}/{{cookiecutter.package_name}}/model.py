"""Anomaly detection as a LightningModule: a classifier or an autoencoder, a threshold chosen on validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import CatMetric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_precision_recall_curve,
    binary_recall,
)

from {{ cookiecutter.package_name }}.networks import ConvAutoencoder, ConvClassifier
from {{ cookiecutter.package_name }}.plots import examples_figure, pr_curve_figure
from {{ cookiecutter.package_name }}.threshold import RULES, choose_threshold

VARIANTS = ("classifier", "autoencoder")
OPTIMIZERS = ("sgd", "adam")
AE_SCORES = ("patch_max", "mse")


class AnomalyDetector(pl.LightningModule):
    """Scores each image (higher: more anomalous) and flags it when the score exceeds a threshold.

    ``variant="classifier"``: a CNN trained on normal and anomalous images with a class-weighted
    binary cross-entropy; the score is the predicted probability. ``variant="autoencoder"``: a convolutional
    autoencoder trained on normal images only (the data module is told so by ``train.py``); the score is its
    reconstruction error. For both, the threshold is chosen after every validation epoch (best F1 or a target
    recall), kept in the ``threshold`` buffer so that it is saved with the checkpoint, and used as is on test.

    Args:
        variant: ``"classifier"`` or ``"autoencoder"``.
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``; both with coupled weight decay.
        lr: learning rate.
        momentum: SGD momentum, in [0, 1); ``None``: 0.9 for SGD. Adam takes none (its betas play that role).
        weight_decay: coupled weight decay, >= 0.
        channels: output channels of each convolution stage (encoder stages for the autoencoder).
        image_size: side of the input images (``train.py`` links it to ``data.image_size``); the
            autoencoder's dense bottleneck depends on it.
        pos_weight: classifier only: weight of the anomalous class in the loss. ``None``: the ratio of
            normal to anomalous training images, read from the data module when fitting.
        latent_dim: autoencoder only: size of its bottleneck vector (``None``: 32).
        ae_score: autoencoder only: ``"patch_max"`` (``None``'s choice): the largest mean squared error over
            any ``patch_size`` x ``patch_size`` window (a small lesion is not diluted by the whole image);
            ``"mse"``: the mean squared error over the image.
        patch_size: autoencoder with ``ae_score="patch_max"`` only: window side (``None``: 7).
        threshold_rule: ``"f1"`` (best F1 on validation) or ``"recall"`` (highest threshold reaching
            ``target_recall`` on validation).
        target_recall: for ``threshold_rule="recall"``, in (0, 1].
        num_examples: example images logged per evaluation epoch (half normal, half anomalous when available).

    Raises:
        ValueError: for an invalid argument, or one that does not apply to the variant, naming it and the
            accepted values.

    Example:
        >>> model = AnomalyDetector(variant="autoencoder", optimizer="adam", lr=0.002, channels=(8, 16), image_size=32)
        >>> model.score(torch.rand(3, 1, 32, 32))[0].shape
        torch.Size([3])
    """

    def __init__(
        self,
        variant: Literal["classifier", "autoencoder"] = "classifier",
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.02,
        momentum: Optional[float] = None,
        weight_decay: float = 1e-4,
        channels: Sequence[int] = (16, 32, 64),
        image_size: int = 64,
        pos_weight: Optional[float] = None,
        latent_dim: Optional[int] = None,
        ae_score: Optional[Literal["patch_max", "mse"]] = None,
        patch_size: Optional[int] = None,
        threshold_rule: Literal["f1", "recall"] = "f1",
        target_recall: float = 0.9,
        num_examples: int = 8,
    ) -> None:
        super().__init__()
        _check(variant in VARIANTS, "variant", f"one of {VARIANTS}", variant)
        _check(optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}", optimizer)
        _check(_number(lr) and lr > 0, "lr", "a number > 0", lr)
        if optimizer == "sgd":
            momentum = 0.9 if momentum is None else momentum
            _check(_number(momentum) and 0 <= momentum < 1, "momentum", "a number in [0, 1)", momentum)
        _check(optimizer == "sgd" or momentum is None, "momentum", "None with optimizer 'adam'", momentum)
        _check(_number(weight_decay) and weight_decay >= 0, "weight_decay", "a number >= 0", weight_decay)
        channels = tuple(channels)
        _check(len(channels) >= 1 and all(_positive_int(c) for c in channels), "channels", "a non-empty list of positive integers", channels)
        _check(_positive_int(image_size) and image_size >= 2 ** len(channels), "image_size", f"an integer >= {2 ** len(channels)} for {len(channels)} stages", image_size)
        if variant == "classifier":
            given = [name for name, value in (("latent_dim", latent_dim), ("ae_score", ae_score), ("patch_size", patch_size)) if value is not None]
            if given:
                raise ValueError(f"{given} apply to the autoencoder only: leave them unset (None) for the classifier")
            _check(pos_weight is None or (_number(pos_weight) and pos_weight > 0), "pos_weight", "None or a number > 0", pos_weight)
        else:
            _check(pos_weight is None, "pos_weight", "None for the autoencoder (it trains on normal images only)", pos_weight)
            latent_dim = 32 if latent_dim is None else latent_dim
            ae_score = "patch_max" if ae_score is None else ae_score
            _check(_positive_int(latent_dim), "latent_dim", "a positive integer", latent_dim)
            _check(ae_score in AE_SCORES, "ae_score", f"one of {AE_SCORES}", ae_score)
            _check(patch_size is None or ae_score == "patch_max", "patch_size", "None with ae_score 'mse'", patch_size)
            patch_size = 7 if patch_size is None and ae_score == "patch_max" else patch_size
            _check(patch_size is None or _positive_int(patch_size), "patch_size", "a positive integer", patch_size)
        _check(threshold_rule in RULES, "threshold_rule", f"one of {RULES}", threshold_rule)
        _check(_number(target_recall) and 0 < target_recall <= 1, "target_recall", "a number in (0, 1]", target_recall)
        _check(isinstance(num_examples, int) and num_examples >= 0, "num_examples", "an integer >= 0", num_examples)
        # Saved with the defaults resolved, so that the logged hyperparameters say what was used.
        self.save_hyperparameters()
        self.hparams.update(momentum=momentum, latent_dim=latent_dim, ae_score=ae_score, patch_size=patch_size)
        if variant == "classifier":
            self.net: torch.nn.Module = ConvClassifier(channels)
        else:
            self.net = ConvAutoencoder(channels, latent_dim, image_size)
        # Buffers, so that both are saved in (and restored from) every checkpoint.
        self.register_buffer("threshold", torch.tensor(0.5))
        self.register_buffer("loss_pos_weight", torch.tensor(1.0 if pos_weight is None else float(pos_weight)))
        self.scores = torch.nn.ModuleDict({stage: CatMetric() for stage in ("val", "test")})
        self.labels = torch.nn.ModuleDict({stage: CatMetric() for stage in ("val", "test")})
        self._examples: dict[str, dict[str, Tensor]] = {}

    def setup(self, stage: str) -> None:
        """Classifier with ``pos_weight=None``: weight anomalies by the normal/anomalous ratio of the training set."""
        if stage != "fit" or self.hparams.variant != "classifier" or self.hparams.pos_weight is not None:
            return
        counts = getattr(self.trainer.datamodule, "train_class_counts", None)
        if counts is None:
            raise ValueError("`pos_weight=None` needs a data module with `train_class_counts()`; pass a number instead")
        normal, anomalous = counts()
        if normal == 0 or anomalous == 0:
            raise ValueError(f"the classifier needs normal and anomalous training images, got {normal} and {anomalous}")
        self.loss_pos_weight.fill_(normal / anomalous)
        self.hparams["pos_weight_used"] = normal / anomalous  # logged with the other hyperparameters

    def forward(self, x: Tensor) -> Tensor:
        """Anomaly scores ``(N,)``."""
        return self.score(x)[0]

    def score(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``(scores, reconstructions)``: probabilities (classifier, no reconstruction) or reconstruction errors."""
        if self.hparams.variant == "classifier":
            return torch.sigmoid(self.net(x)), None
        reconstruction = self.net(x)
        return self._reconstruction_score(x, reconstruction), reconstruction

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self._loss(x, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # Runs after the GC callback's hook, so in the GC arm this is the norm the optimizer sees.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0.0
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        if self.hparams.variant == "classifier":
            return F.binary_cross_entropy_with_logits(self.net(x), y.float(), pos_weight=self.loss_pos_weight)
        return F.mse_loss(self.net(x), x)

    def _reconstruction_score(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        error = (x - reconstruction).square()
        if self.hparams.ae_score == "mse":
            return error.mean(dim=(1, 2, 3))
        size = min(self.hparams.patch_size, x.shape[-2], x.shape[-1])
        return F.avg_pool2d(error, size, stride=1).amax(dim=(1, 2, 3))

    def _eval_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        x, y = batch
        scores, reconstruction = self.score(x)
        if self.hparams.variant == "classifier":
            loss = F.binary_cross_entropy(scores.clamp(1e-7, 1 - 1e-7), y.float())
        else:
            loss = F.mse_loss(reconstruction, x)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.scores[stage].update(scores)
        self.labels[stage].update(y)
        if batch_idx == 0:
            self._keep_examples(stage, x, y, scores, reconstruction)

    def _keep_examples(self, stage: str, x: Tensor, y: Tensor, scores: Tensor, reconstruction: Optional[Tensor]) -> None:
        half = self.hparams.num_examples // 2
        normal, anomalous = torch.nonzero(y == 0).flatten(), torch.nonzero(y == 1).flatten()
        take_anomalous = anomalous[: max(half, self.hparams.num_examples - len(normal))]
        take = torch.cat([normal[: self.hparams.num_examples - len(take_anomalous)], take_anomalous])
        self._examples[stage] = {"images": x[take], "labels": y[take], "scores": scores[take]}
        if reconstruction is not None:
            self._examples[stage]["reconstructions"] = reconstruction[take]

    def _eval_epoch_end(self, stage: str) -> None:
        # compute() is a collective under DDP: every rank gets all scores, so every rank picks the same threshold.
        scores, labels = self.scores[stage].compute(), self.labels[stage].compute().long()
        self.scores[stage].reset()
        self.labels[stage].reset()
        examples = self._examples.pop(stage, None)
        if self.trainer.sanity_checking:
            return
        if stage == "val":
            self.threshold.fill_(choose_threshold(scores, labels, self.hparams.threshold_rule, self.hparams.target_recall))
        threshold = float(self.threshold)
        values = {
            "precision": binary_precision(scores, labels, threshold=threshold),
            "recall": binary_recall(scores, labels, threshold=threshold),
            "f1": binary_f1_score(scores, labels, threshold=threshold),
            "auroc": binary_auroc(scores, labels),
            "average_precision": binary_average_precision(scores, labels),
            "threshold": self.threshold,
        }
        # Equal on every rank already: sync_dist only averages equal values and marks them as global.
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, sync_dist=True)
        logger = self.logger
        if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
            precision, recall, _ = binary_precision_recall_curve(scores, labels)
            chosen = (float(values["precision"]), float(values["recall"]))
            # After fit, the trainer's epoch counter is past the last epoch, not that of the tested checkpoint.
            title = f"val, epoch {self.current_epoch}" if stage == "val" else "test"
            writer = logger.experiment
            writer.add_figure(f"{stage}/pr_curve", pr_curve_figure(precision, recall, chosen, title), self.global_step)
            if examples is not None and len(examples["images"]):
                figure = examples_figure(threshold=threshold, title=title, **examples)
                writer.add_figure(f"{stage}/examples", figure, self.global_step)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check(ok: bool, name: str, accepted: str, value: object) -> None:
    if not ok:
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")
