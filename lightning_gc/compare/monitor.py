"""The callback ``lightning-gc compare`` adds to every run: stop on a non-finite loss, report progress, tag hparams."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


class RunMonitor(Callback):
    """Watch one run of a comparison from inside the trainer.

    * Divergence is a result, not a crash: when the training loss of a batch is NaN or infinite the run is
      stopped after that batch (``trainer.should_stop``, as ``EarlyStopping(check_finite=True)`` does, but
      without waiting for the end of the epoch) and the status file says ``"diverged"``.
    * Progress: ``status_file`` holds the run's state, epoch and step as JSON, rewritten at most every
      ``interval`` seconds and at every epoch end, so the comparison can show how far the run is.
    * Class balance: the labels of the first full validation pass are counted (when batches are
      ``(inputs, labels)`` or dicts with a ``label(s)``/``target(s)``/``y`` entry of integer class indices) and
      written as ``val_class_counts``, so the comparison knows what a constant predictor would score.
    * Hyperparameters: the run's ``hparams.yaml`` holds the model's and data module's hyperparameters plus
      ``compare/arm`` and ``compare/seed``. No HPARAMS summary is written here: TensorBoard keeps the first
      one of a run only, and the comparison writes it at the end, with the run's status and final metric
      (:func:`lightning_gc.compare.tensorboard.write_arm_view`).

    The compare tool adds it with ``--trainer.callbacks+=lightning_gc.compare.RunMonitor``; it changes neither
    the model, the data order nor the random state, so the arms of a seed stay identical but for GC.

    Args:
        status_file: where to write the JSON state; ``None`` writes nothing.
        loss: the logged metric to check when ``training_step`` returns no loss tensor.
        arm: the arm's name (``"baseline"`` or ``"gc"``), recorded as the hparam ``compare/arm``.
        seed: the run's seed, recorded as the hparam ``compare/seed``.
        interval: least seconds between two progress writes.

    Raises:
        ValueError: if ``interval`` is negative.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[RunMonitor(arm="gc", seed=0)], logger=False)
    """

    def __init__(
        self,
        status_file: str | None = None,
        loss: str = "train/loss",
        arm: str | None = None,
        seed: int | None = None,
        interval: float = 0.5,
    ) -> None:
        if not (isinstance(interval, (int, float)) and interval >= 0):
            raise ValueError(f"`interval` must be a number of seconds >= 0, got {interval!r}")
        self.status_file = status_file
        self.loss = loss
        self.arm = arm
        self.seed = seed
        self.interval = float(interval)
        self.diverged_at_step: int | None = None
        self._last_write = -math.inf
        self._batch_step = 0
        self._total_steps: int | None = None
        self._class_counts: Tensor | None = None
        self._counting = True  # until the first full validation pass has been counted, or batches cannot be

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # This callback records the hparams itself, with the comparison's tags (see `on_fit_start`), and no
        # HPARAMS summary: the comparison writes the run's session once it knows how the run ended.
        if _tensorboard(trainer) is not None:
            trainer.enable_autolog_hparams = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is not None and trainer.is_global_zero:
            logger.hparams.update(self._hparams(trainer, pl_module))
            logger.save()  # hparams.yaml
        self._write(trainer, "running", force=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # On every rank, once the train dataloader is loaded: may load it, which is collective under DDP.
        total = trainer.estimated_stepping_batches
        self._total_steps = int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None
        self._write(trainer, "running", force=True)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step  # the step this batch's metrics are logged at

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            loss = trainer.callback_metrics.get(self.loss)
        non_finite = isinstance(loss, Tensor) and not bool(loss.detach().isfinite().all())
        # every rank must stop together (a no-op without a process group), as EarlyStopping decides
        if trainer.strategy.reduce_boolean_decision(non_finite, all=False):
            # `should_stop` ends the epoch loop after this batch; `min_epochs`/`min_steps` could delay it.
            trainer.should_stop = True
            if self.diverged_at_step is None:
                self.diverged_at_step = self._batch_step
            self._write(trainer, "diverged", force=True)
            return
        self._write(trainer, "running")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "diverged" if self.diverged_at_step is not None else "running", force=True)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not self._counting or dataloader_idx != 0:
            return
        labels = class_labels(batch)
        if labels is None:
            self._counting, self._class_counts = False, None
            return
        counts = torch.bincount(labels.detach().flatten().cpu())
        if self._class_counts is not None:
            width = max(len(counts), len(self._class_counts))
            counts = _padded(counts, width) + _padded(self._class_counts, width)
        self._class_counts = counts

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._class_counts is not None:
            self._counting = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "diverged" if self.diverged_at_step is not None else "fit_done", force=True)

    def state_dict(self) -> dict[str, Any]:
        return {"diverged_at_step": self.diverged_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diverged_at_step = state_dict.get("diverged_at_step")

    def _hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        params: dict[str, Any] = {}
        datamodule = getattr(trainer, "datamodule", None)  # set by the fit loop, not declared on Trainer
        if datamodule is not None and getattr(datamodule, "_log_hyperparams", True):
            params.update(datamodule.hparams_initial)
        if getattr(pl_module, "_log_hyperparams", True):
            params.update(pl_module.hparams_initial)
        params = {k: v for k, v in params.items() if not str(k).startswith("_")}  # LightningCLI's internals
        params["compare/arm"] = self.arm if self.arm is not None else ""
        params["compare/seed"] = self.seed if self.seed is not None else -1
        return params

    def _write(self, trainer: pl.Trainer, state: str, force: bool = False) -> None:
        now = time.monotonic()
        if (
            self.status_file is None
            or not trainer.is_global_zero
            or (not force and now - self._last_write < self.interval)
        ):
            return
        self._last_write = now
        status = {
            "state": state,
            "epoch": trainer.current_epoch,
            "max_epochs": trainer.max_epochs,
            "step": trainer.global_step,
            "total_steps": self._total_steps,
            "diverged_at_step": self.diverged_at_step,
            "val_class_counts": None if self._class_counts is None else self._class_counts.tolist(),
        }
        tmp = f"{self.status_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(status, f)
        os.replace(tmp, self.status_file)


_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def class_labels(batch: Any) -> Tensor | None:
    """The integer class labels of a validation batch, or ``None`` when it does not hold them visibly.

    Example:
        >>> class_labels((torch.zeros(2, 3), torch.tensor([1, 0]))).tolist()
        [1, 0]
        >>> class_labels({"image": torch.zeros(2, 3)}) is None
        True
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[-1]
    elif isinstance(batch, dict):
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    else:
        return None
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        return None
    if labels.dtype == torch.bool or labels.dim() != 1 or not labels.numel() or bool((labels < 0).any()):
        return None
    return labels


def _padded(counts: Tensor, width: int) -> Tensor:
    """``counts`` padded with zeros to ``width`` entries."""
    return torch.cat([counts, counts.new_zeros(width - len(counts))])


def _tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
