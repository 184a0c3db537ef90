"""The callback's diagnostics: written straight to the loggers, counts when they change, norms against float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import Logger
from models import GradRecorder, TinyModule, loader, make_batches, trainer

from lightning_gc import GradientCentralization


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call, as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def gc_calls(logger: RecordingLogger) -> list[tuple[int | None, dict[str, float]]]:
    return [
        (s, {k: v for k, v in m.items() if k.startswith("gc/")}) for s, m in logger.calls if any("gc/" in k for k in m)
    ]


def test_diagnostics_bypass_lightning_module_log(monkeypatch):
    """``LightningModule.log`` costs result-collection bookkeeping per metric: GC writes to the loggers itself."""
    original = LightningModule.log

    def guarded_log(self, name, *args, **kwargs):
        assert not name.startswith("gc/"), f"{name} went through LightningModule.log"
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(LightningModule, "log", guarded_log)
    logger = RecordingLogger()
    t = trainer(callbacks=[GradientCentralization()], logger=logger, log_every_n_steps=2)
    t.fit(TinyModule(), loader(make_batches(6)))
    assert [step for step, _ in gc_calls(logger)] == [1, 3, 5]
    assert {"gc/grad_norm", "gc/removed_norm_ratio", "gc/centralized_tensors"} <= set(t.logged_metrics)


def test_counts_are_written_once_and_again_when_they_change():
    class UnfreezeHead(GradRecorder):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.net.head.weight.requires_grad_(batch_idx >= 3)

    logger = RecordingLogger()
    module = TinyModule()
    t = trainer(callbacks=[UnfreezeHead(), GradientCentralization()], logger=logger, log_every_n_steps=1)
    t.fit(module, loader(make_batches(6)))
    calls = gc_calls(logger)
    assert len(calls) == 6
    with_counts = [i for i, (_, m) in enumerate(calls) if "gc/centralized_tensors" in m]
    assert with_counts == [0, 3]
    head = module.net.head.weight
    assert calls[3][1]["gc/centralized_tensors"] == calls[0][1]["gc/centralized_tensors"] + 1
    assert calls[3][1]["gc/centralized_elements"] == calls[0][1]["gc/centralized_elements"] + head.numel()
    assert all({"gc/grad_norm", "gc/removed_norm_ratio"} <= set(m) for _, m in calls)


@pytest.mark.parametrize("log_every_n_steps", [1, 3])
def test_norms_match_a_float64_reference_of_the_gradients(log_every_n_steps):
    before, after, logger = GradRecorder(), GradRecorder(), RecordingLogger()
    callbacks = [before, GradientCentralization(), after]
    trainer(callbacks=callbacks, logger=logger, log_every_n_steps=log_every_n_steps).fit(
        TinyModule(), loader(make_batches(6))
    )
    calls = gc_calls(logger)
    assert len(calls) == 6 // log_every_n_steps
    for step, metrics in calls:
        b, a = before.seen[step], after.seen[step]
        names = [n for n in b if b[n].ndim >= 2]
        total = math.sqrt(sum(float(b[n].square().sum()) for n in names))
        removed = math.sqrt(sum(float((b[n] - a[n]).square().sum()) for n in names))
        assert metrics["gc/grad_norm"] == pytest.approx(total, rel=1e-5)
        assert metrics["gc/removed_norm_ratio"] == pytest.approx(removed / total, rel=1e-5)
        assert isinstance(metrics["gc/grad_norm"], float)
