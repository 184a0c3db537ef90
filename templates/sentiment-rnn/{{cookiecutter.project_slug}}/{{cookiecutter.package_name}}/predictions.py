"""Printing ``predict`` results: one line per review, label and its probability."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from .corpus import LABEL_NAMES


def format_prediction(text: str, probability_positive: float, excerpt: int = 60) -> str:
    """``label<TAB>probability of that label<TAB>start of the review``.

    Example:
        >>> format_prediction("A tedious, overlong mess.", 0.125)
        'negative\\t0.8750\\tA tedious, overlong mess.'
    """
    positive = probability_positive >= 0.5
    probability = probability_positive if positive else 1.0 - probability_positive
    shown = text if len(text) <= excerpt else text[: excerpt - 3] + "..."
    return f"{LABEL_NAMES[int(positive)]}\t{probability:.4f}\t{shown}"


class PrintPredictions(Callback):
    """Print every prediction once ``predict`` is over, in the order of the input file.

    The lines are written after the progress bar has closed (this callback comes after it), so that they are
    plain tab-separated lines, never drawn into or reformatted by the bar. Meant for one device.

    Args:
        stream: where to write; default standard output.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.lines: list[str] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lines = []

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        probabilities = outputs["probabilities"].tolist()
        self.lines.extend(format_prediction(text, p) for text, p in zip(outputs["texts"], probabilities))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        for line in self.lines:
            print(line, file=stream)
        stream.flush()
