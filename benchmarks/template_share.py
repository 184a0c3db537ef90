"""The callback's share of the training step on the shipped templates, with their own ``configs/gc.yaml``.

Each template is rendered (``lightning_gc.cli.new.render``, as ``lightning-gc new`` does) into a temporary
folder and trained in this process through its own LightningCLI classes and config, diagnostics on and the
config's TensorBoard logger and ``log_every_n_steps``; only the length (``max_steps``), validation (off) and
data-loader workers (none) are overridden. A timing callback records each training batch from
``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, GC, optimizer step: Lightning's
``run_training_batch``) and the time spent in the GC callback's per-step work, by wall clock and by the main
thread's CPU time: its ``on_before_optimizer_step`` and ``on_train_batch_end`` hooks, and its handing of
waiting TensorBoard events to the writer wherever that happens (a full batch, an epoch's end, teardown:
``_flush_events``), so that work deferred out of the step is still counted. The first step builds the plan
and is left out (also reported with it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_gc import GradientCentralization
from lightning_gc.cli.new import find_templates, render


class StepTimer(pl.Callback):
    """Times every training batch and the GC hook inside it (wall clock and thread CPU time)."""

    def __init__(self) -> None:
        self.batch: list[tuple[float, float]] = []
        self.hook: list[tuple[float, float]] = []
        self._started = (0.0, 0.0)

    def on_train_batch_start(self, *args: Any) -> None:
        self._started = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, *args: Any) -> None:
        self.batch.append((time.perf_counter() - self._started[0], time.thread_time() - self._started[1]))

    def wrap(self, callback: GradientCentralization) -> None:
        """Time ``callback``'s per-step work: the step's hook, and the rest added to the step it follows."""
        self._wrap(callback, "on_before_optimizer_step", new_step=True)
        for name in ("on_train_batch_end", "_flush_events"):
            self._wrap(callback, name, new_step=False)

    def _wrap(self, callback: GradientCentralization, name: str, new_step: bool) -> None:
        method = getattr(callback, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            result = method(*args, **kwargs)
            spent = (time.perf_counter() - wall, time.thread_time() - cpu)
            if new_step or not self.hook:
                self.hook.append(spent)
            else:  # work of the step before (an epoch-end flush, say) counts for that step
                self.hook[-1] = (self.hook[-1][0] + spent[0], self.hook[-1][1] + spent[1])
            return result

        setattr(callback, name, timed)


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as working directory and first on ``sys.path`` (the project's package and configs)."""
    previous = Path.cwd()
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        os.chdir(previous)


def cli_classes(project: Path, module_name: str) -> tuple[type, type]:
    """The LightningModule and LightningDataModule classes the project's ``train.py`` hands to LightningCLI."""
    spec = importlib.util.spec_from_file_location(module_name, project / "train.py")
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    classes = [c for c in vars(train).values() if inspect.isclass(c)]
    model = next(c for c in classes if issubclass(c, pl.LightningModule))
    data = next(c for c in classes if issubclass(c, pl.LightningDataModule))
    return model, data


def template_share(template: str, steps: int) -> dict[str, Any]:
    """Render ``template``, train ``steps`` steps with its ``configs/gc.yaml``; return the hook's share."""
    slug = "bench-" + template
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and intervals, not results
        project = render(template, Path(tmp) / slug)
        with inside(project):
            model_class, data_class = cli_classes(project, f"{slug.replace('-', '_')}_train")
            args = [
                "--config", "configs/gc.yaml", f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            ]  # fmt: skip
            if "num_workers" in inspect.signature(data_class).parameters:
                args.append("--data.num_workers=0")
            cli = LightningCLI(model_class, data_class, args=args, run=False, save_config_kwargs={"overwrite": True})
            trainer = cli.trainer
            gc = next(c for c in trainer.callbacks if isinstance(c, GradientCentralization))  # type: ignore[attr-defined]
            timer = StepTimer()
            timer.wrap(gc)
            trainer.callbacks.append(timer)  # type: ignore[attr-defined]
            trainer.fit(cli.model, datamodule=cli.datamodule)
    hook, batch = timer.hook, timer.batch
    assert len(hook) == len(batch), (len(hook), len(batch))
    wall = [h / b for (h, _), (b, _) in zip(hook[1:], batch[1:])]
    return {
        "steps": len(batch),
        "log_every_n_steps": trainer.log_every_n_steps,
        "log_diagnostics": gc.log_diagnostics,
        "hook_share": sum(h for h, _ in hook[1:]) / sum(b for b, _ in batch[1:]),
        "hook_share_cpu_time": sum(c for _, c in hook[1:]) / sum(c for _, c in batch[1:]),
        "hook_share_incl_first_step": sum(h for h, _ in hook) / sum(b for b, _ in batch),
        "hook_share_max_step": max(wall),
        "hook_ms_per_step": 1e3 * sum(h for h, _ in hook[1:]) / (len(hook) - 1),
        "batch_ms_per_step": 1e3 * sum(b for b, _ in batch[1:]) / (len(batch) - 1),
    }


def all_template_shares(steps: int) -> dict[str, dict[str, Any]]:
    """:func:`template_share` for every shipped template, in one process."""
    torch.set_num_threads(1)  # what the templates' train.py sets unless OMP_NUM_THREADS is given
    return {name: template_share(name, steps) for name in sorted(find_templates())}


if __name__ == "__main__":
    for name, share in all_template_shares(int(sys.argv[1]) if len(sys.argv) > 1 else 60).items():
        print(name, {k: round(v, 5) if isinstance(v, float) else v for k, v in share.items()}, flush=True)
