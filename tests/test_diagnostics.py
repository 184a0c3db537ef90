"""The callback's diagnostics: written straight to the loggers, counts when they change, norms against float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import Logger
from models import GradRecorder, TinyModule, loader, make_batches, trainer

from lightning_gc import GradientCentralization
from lightning_gc.diagnostics import GCStats


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


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar in the event files under ``folder``: tag -> [(step, value, wall_time)], in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag))
    return out


@pytest.mark.parametrize("prefix", ["", "run"])
def test_tensorboard_gets_what_log_metrics_would_write_at_every_logging_step(tmp_path, prefix):
    """40 logging steps (more than a batch of waiting events): same tags, steps and values as ``log_metrics``."""
    from lightning.fabric.utilities.logger import _add_prefix
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gc.diagnostics import BATCH_STEPS

    assert BATCH_STEPS < 40
    recording, tensorboard = RecordingLogger(), TensorBoardLogger(tmp_path, name="tb", prefix=prefix)
    t = trainer(callbacks=[GradientCentralization()], logger=[tensorboard, recording], log_every_n_steps=1)
    t.fit(TinyModule(), loader(make_batches(40)))
    written = tensorboard_scalars(tmp_path)
    expected: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in gc_calls(recording):
        for tag, value in _add_prefix(metrics, prefix, TensorBoardLogger.LOGGER_JOIN_CHAR).items():
            expected.setdefault(tag, []).append((step, value))
    assert len(expected[f"{prefix}-gc/grad_norm" if prefix else "gc/grad_norm"]) == 40
    assert set(expected) <= set(written)
    for tag, values in expected.items():
        got = [(step, value) for step, value, _ in written[tag]]
        assert [s for s, _ in got] == [s for s, _ in values], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in values], rel=1e-6), tag  # float32 in the file
        walls = [w for _, _, w in written[tag]]
        assert walls == sorted(walls) and (len(walls) == 1 or walls[-1] > walls[0]), "each step's own wall time"


def test_waiting_tensorboard_events_reach_the_writer_at_each_epoch_end(tmp_path):
    """Fewer logging steps than a batch: nothing may wait past the epoch (or the fit) they belong to."""
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    class Probe(Callback):
        def __init__(self) -> None:
            self.seen: list[int] = []

        def on_train_epoch_end(self, trainer, pl_module):  # runs after GradientCentralization's
            trainer.logger.experiment.flush()
            self.seen.append(len(tensorboard_scalars(tmp_path).get("gc/grad_norm", [])))

    probe = Probe()
    t = trainer(callbacks=[GradientCentralization(), probe], logger=TensorBoardLogger(tmp_path, name="tb"),
                log_every_n_steps=1, max_epochs=2)  # fmt: skip
    t.fit(TinyModule(), loader(make_batches(5)))
    assert probe.seen == [5, 10]
    assert [s for s, _, _ in tensorboard_scalars(tmp_path)["gc/grad_norm"]] == list(range(10))


def test_stats_from_host_sums_make_their_tensors_only_when_read_and_follow_what_is_set():
    stats = GCStats.from_host_sums(tensors=2, elements=8, grad_sq=9.0, removed_sq=1.0)
    assert stats.norms() == (3.0, 1.0 / 3.0)
    assert isinstance(stats.grad_sq, torch.Tensor) and stats.grad_sq.item() == 9.0
    assert stats.removed_norm_ratio is not None
    assert math.isclose(stats.removed_norm_ratio.item(), 1.0 / 3.0, rel_tol=1e-6)
    stats.grad_sq = torch.tensor(4.0)
    assert stats.norms() == (2.0, 0.5)  # the floats no longer describe the stats: the tensors are read
