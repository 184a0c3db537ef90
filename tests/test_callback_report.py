"""The callback's selection report at fit start, layouts from a LightningCLI config, zero-size weights."""

from __future__ import annotations

import logging

import pytest
import torch
from models import TinyModule, loader, make_batches, trainer
from torch import nn

from lightning_gc import GradientCentralization
from lightning_gc.layouts import REGISTRY, unregister_layout


def test_the_summary_is_logged_once_at_fit_start_and_the_table_at_debug_level(caplog):
    with caplog.at_level(logging.DEBUG, logger="lightning.pytorch.utilities.rank_zero"):
        trainer(callbacks=[GradientCentralization()], max_epochs=2).fit(TinyModule(), loader(make_batches(2)))
    infos = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and "GradientCentralization:" in r.getMessage()
    ]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "decision" in r.getMessage()]
    assert len(infos) == 1 and "3 centralized" in infos[0]
    assert len(debugs) == 1 and "net.up.weight" in debugs[0]


def test_report_table_and_none(caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        trainer(callbacks=[GradientCentralization(report="table")]).fit(TinyModule(), loader(make_batches(1)))
    assert any("net.head.weight" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="lightning.pytorch.utilities.rank_zero"):
        trainer(callbacks=[GradientCentralization(report="none")]).fit(TinyModule(), loader(make_batches(1)))
    assert not any("GradientCentralization" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="`report`"):
        GradientCentralization(report="full")  # type: ignore[arg-type]


def test_the_table_goes_to_tensorboard_as_text(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(callbacks=[GradientCentralization()], logger=logger).fit(TinyModule(), loader(make_batches(1)))
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("gc/selection/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| net.up.weight |" in text and "centralized" in text


def test_layouts_from_a_lightning_cli_config(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 3))  # stored (in, out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.kernel

    Dense.__module__, Dense.__qualname__ = "my_project.layers", "Dense"

    class CLIModule(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.dense = Dense()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y) + self.dense(torch.ones(2, 4)).sum()

        def train_dataloader(self):
            return loader(make_batches(2))

    config = tmp_path / "gc.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_gc.GradientCentralization\n"
        "      init_args:\n"
        "        layouts:\n"
        "          - {layer: my_project.layers.Dense, param: kernel, out_dims: [1], reason: 'stored (in, out)'}\n"
    )
    cli = LightningCLI(
        CLIModule,
        args=["fit", f"--config={config}", "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.accelerator=cpu"],
        save_config_callback=None,
    )  # fmt: skip
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GradientCentralization)]
    try:
        (plan,) = callback.plans
        rows = {r.name: r for r in plan.selection.choices}  # type: ignore[attr-defined]
        assert rows["dense.kernel"].decision == "centralized" and rows["dense.kernel"].dims == (0,)
        assert rows["dense.kernel"].reason == "stored (in, out)"
    finally:
        for entry in callback.layouts:
            unregister_layout(entry)
    assert REGISTRY.entry(Dense(), "kernel") is None


def test_a_zero_size_weight_is_skipped_under_the_trainer():
    class WithEmpty(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.empty = nn.Linear(0, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y) + self.empty(torch.ones(2, 0)).sum()

    module = WithEmpty()
    callback = GradientCentralization()
    trainer(callbacks=[callback]).fit(module, loader(make_batches(2)))
    assert callback.optimizer_steps == 2
    (plan,) = callback.plans
    assert "empty.weight" not in [t.name for t in plan.targets]  # type: ignore[attr-defined]
