"""Both arms run end to end (fast_dev_run), and a short real fit checkpoints, tests and logs what the comparison reads."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from lightning_gc import GradientCentralization

import train
from {{ cookiecutter.package_name }}.model import DigitsCNN

PROJECT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _in_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT)  # the configs use paths relative to the project
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's


def _row_means(model: torch.nn.Module) -> list[float]:
    """Largest |mean over all dims but the output dim| of each weight gradient, relative to its scale."""
    out = []
    for p in model.parameters():
        if p.dim() > 1 and p.grad is not None:
            g = p.grad.double()
            out.append((g.mean(dim=tuple(range(1, g.dim()))).abs().max() / g.abs().max()).item())
    return out


@pytest.mark.parametrize(
    ("configs", "gc", "lr"),
    [
        (["configs/gc.yaml"], True, 0.05),
        (["configs/baseline.yaml"], False, 0.05),
        (["configs/gc.yaml", "configs/settings/high_lr.yaml"], True, 0.1),
        (["configs/gc.yaml", "configs/settings/batchnorm.yaml"], True, 0.05),
        (["configs/baseline.yaml", "configs/settings/batchnorm.yaml"], False, 0.05),
        (["configs/gc.yaml", "configs/settings/batchnorm.yaml", "--model.norm", "group"], True, 0.05),
    ],
)
def test_fast_dev_run(configs: list[str], gc: bool, lr: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The module's hook runs after every callback's: record what the optimizer is about to see.
    seen = []
    hook = DigitsCNN.on_before_optimizer_step
    monkeypatch.setattr(DigitsCNN, "on_before_optimizer_step", lambda self, opt: (seen.append(_row_means(self)), hook(self, opt)))
    args = ["fit", *[a for c in configs for a in (("--config", c) if c.endswith(".yaml") else (c,))],
            "--trainer.fast_dev_run", "2", *QUIET,
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = train.main(args)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, GradientCentralization)]
    assert len(callbacks) == int(gc)
    assert cli.model.hparams.lr == lr
    norm = configs[-1] if not configs[-1].endswith(".yaml") else "batch" if "batchnorm" in configs[-1] else "none"
    assert cli.model.hparams.norm == norm
    norm_layers = [m for m in cli.model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert len(norm_layers) == (0 if norm == "none" else 2)
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "train/grad_norm", "val/loss", "val/acc"):
        assert math.isfinite(metrics[name].item()), name
    # Every weight gradient stepped on was centralized in the GC arm, and none in the baseline.
    assert len(seen) == 2 and all(len(means) == 4 for means in seen)
    means = [m for step in seen for m in step]
    if gc:
        assert callbacks[0].optimizer_steps == 2
        assert max(means) < 1e-5
    else:
        assert min(means) > 1e-3


def test_fit_checkpoints_then_tests_best(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["fit", "--config", "configs/gc.yaml", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6",
            "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2", *QUIET,
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.version", "seed_0"]
    cli = train.main(args)
    log_dir = tmp_path / "gc" / "seed_0"
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/acc" and Path(checkpoint.best_model_path).parent == log_dir / "checkpoints"
    assert 0 <= cli.trainer.callback_metrics["test/acc"].item() <= 1
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/acc", "train/grad_norm", "val/loss", "val/acc", "test/acc", "test/loss",
                "gc/removed_norm_ratio", "gc/grad_norm", *(f"val/acc_class_{k}" for k in range(10))}
    assert expected <= scalars, expected - scalars
    # One confusion matrix per validation epoch (none for the sanity check), one for the test.
    assert [e.step for e in events.Images("val/confusion_matrix")] == [6, 12]
    assert len(events.Images("test/confusion_matrix")) == 1
    assert (log_dir / "config.yaml").is_file()
