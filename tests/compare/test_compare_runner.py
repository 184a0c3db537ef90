"""The training command follows the template convention exactly, then adds the monitor and the user's args."""

from pathlib import Path

from lightning_gc.compare.project import load_project
from lightning_gc.compare.runner import plans


def test_the_command_is_the_convention_then_the_monitor_then_extra_args(tiny_project, tmp_path):
    project = load_project(tiny_project, configs=["configs/settings/huge_lr.yaml"])
    todo = plans(project, range(2), tmp_path, max_epochs=5, lightning_args=["--data.batch_size", "8"])
    assert [(p.arm, p.seed) for p in todo] == [("baseline", 0), ("gc", 0), ("baseline", 1), ("gc", 1)]
    plan = todo[3]
    assert plan.run_dir == tmp_path / "gc" / "seed_1"
    root = Path(tiny_project).resolve()
    assert plan.command(python="python") == [
        "python", "train.py", "fit",
        "--config", str(root / "configs" / "gc.yaml"),
        "--config", str(root / "configs" / "settings" / "huge_lr.yaml"),
        "--seed_everything", "1",
        "--trainer.max_epochs", "5",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "gc"),
        "--trainer.logger.init_args.name", "",
        "--trainer.logger.init_args.version", "seed_1",
        "--trainer.callbacks+=lightning_gc.compare.RunMonitor",
        "--trainer.callbacks.init_args.status_file", str(tmp_path / "gc" / "seed_1" / "status.json"),
        "--trainer.callbacks.init_args.arm", "gc",
        "--trainer.callbacks.init_args.seed", "1",
        "--trainer.callbacks.init_args.metrics", '["val/acc", "val/loss"]',
        "--data.batch_size", "8",
    ]  # fmt: skip


def test_without_max_epochs_the_configs_value_is_kept(tiny_project, tmp_path):
    plan = plans(load_project(tiny_project), [0], tmp_path, max_epochs=None, lightning_args=[])[0]
    assert "--trainer.max_epochs" not in plan.command()
