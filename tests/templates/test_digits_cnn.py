"""The digits-cnn template renders and its project's own tests pass (offline, in place)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rendering import assert_fully_rendered, assert_project_tests_pass, render


def _render(tmp_path: Path) -> Path:
    return render("digits-cnn", tmp_path, "Digits Test")


@pytest.mark.slow
def test_rendered_project_passes_its_own_tests(tmp_path: Path) -> None:
    project = _render(tmp_path)
    assert project.name == "digits-test" and (project / "digits_test" / "model.py").is_file()
    assert_fully_rendered(project)
    assert_project_tests_pass(project)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    """``--trainer.devices 2 --trainer.strategy ddp`` trains with GC, checkpoints and tests, on CPU (gloo)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    project = _render(tmp_path)
    args = [
        "fit",
        "--config",
        "configs/gc.yaml",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.limit_test_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    log_dir = tmp_path / "runs" / "gc" / "version_0"
    assert [p.name for p in (log_dir / "checkpoints").iterdir()] == ["epoch=0-step=4.ckpt"]
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"val/acc", "test/acc", "train/grad_norm", "gc/removed_norm_ratio"} <= set(scalars)
    assert len(events.Scalars("gc/removed_norm_ratio")) == 4  # one per optimizer step, logged by rank zero
