"""The callback's share of real training steps, read from Lightning's own profiler.

Two small models on random data of the real shapes: a digits CNN (MNIST-sized 1x28x28 images, the classic
two-conv network) and a small transformer language model. The share is the total time Lightning's
``SimpleProfiler`` records for ``GradientCentralization.on_before_optimizer_step`` over its total for
``run_training_batch``, over all steps but the first (which builds the plan; reported separately too).
The profiler also records the main thread's CPU time per action: with one intra-op thread and no loader
workers all the step's work runs there, and CPU time leaves out the preemptions that wall-clock totals on
a shared machine pick up.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.profilers import SimpleProfiler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gc import GradientCentralization


class DigitsCNN(pl.LightningModule):
    """The PyTorch MNIST example network: conv 32, conv 64, max-pool, linear 128, linear 10 (1.2M params)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class TinyTransformerLM(pl.LightningModule):
    """A 2-layer pre-norm transformer language model (width 128, 4 heads, vocabulary 2,000, context 64)."""

    def __init__(self, vocab: int = 2000, width: int = 128, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        inputs = tokens[:, :-1]  # (batch, context)
        hidden = self.body(self.embed(inputs) + self.position, mask=self.mask, is_causal=True)
        loss = nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), tokens[:, 1:].flatten())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def digits_data(steps: int, batch: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (steps * batch,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def text_data(steps: int, batch: int = 16, context: int = 65, vocab: int = 2000) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, vocab, (steps * batch, context), generator=g)), batch_size=batch)


MODELS: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[int], DataLoader]]] = {
    "digits-cnn": (DigitsCNN, digits_data),
    "tiny-transformer": (TinyTransformerLM, text_data),
}


class CPUTimeProfiler(SimpleProfiler):
    """Lightning's ``SimpleProfiler`` that also records the calling thread's CPU time of every action."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_started: dict[str, float] = {}
        self.recorded_cpu: dict[str, list[float]] = defaultdict(list)

    def start(self, action_name: str) -> None:
        self.cpu_started[action_name] = time.thread_time()
        super().start(action_name)

    def stop(self, action_name: str) -> None:
        super().stop(action_name)
        self.recorded_cpu[action_name].append(time.thread_time() - self.cpu_started.pop(action_name))


def hook_share(model_name: str, steps: int, log_every_n_steps: int = 50) -> dict[str, float]:
    """Train ``steps`` steps on CPU with the callback and Lightning's ``SimpleProfiler``; return the shares."""
    build_model, build_data = MODELS[model_name]
    pl.seed_everything(0, verbose=False)
    callback = GradientCentralization()
    with tempfile.TemporaryDirectory() as logs, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and log intervals, not results
        profiler = CPUTimeProfiler(dirpath=logs, filename="profile")  # its report goes to a file, not stdout
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, callbacks=[callback], profiler=profiler,
            logger=CSVLogger(logs), log_every_n_steps=log_every_n_steps, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(build_model(), build_data(steps))
    hook_action = f"[Callback]{callback.state_key}.on_before_optimizer_step"
    hook, batch = profiler.recorded_durations[hook_action], profiler.recorded_durations["run_training_batch"]
    hook_cpu, batch_cpu = profiler.recorded_cpu[hook_action], profiler.recorded_cpu["run_training_batch"]
    return {
        "steps": len(batch),
        "hook_share": sum(hook[1:]) / sum(batch[1:]),
        "hook_share_incl_first_step": sum(hook) / sum(batch),
        # wall-clock totals on a shared machine include preemptions; the ratio of medians shows the typical step
        "hook_share_of_medians": statistics.median(hook[1:]) / statistics.median(batch[1:]),
        "hook_share_cpu_time": sum(hook_cpu[1:]) / sum(batch_cpu[1:]),
        "hook_ms_per_step": 1e3 * sum(hook[1:]) / max(1, len(hook) - 1),
        "batch_ms_per_step": 1e3 * sum(batch[1:]) / max(1, len(batch) - 1),
    }
