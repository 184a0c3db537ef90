"""Run a worker script as ``world`` local ranks (gloo, CPU) the way a cluster launcher would.

Each rank is a fresh interpreter with ``MASTER_ADDR/PORT``, ``WORLD_SIZE``, ``NODE_RANK`` and
``LOCAL_RANK`` set, so Lightning's ``LightningEnvironment`` joins them instead of spawning its own
processes. Workers tear their process group down themselves before exiting; a rank that exits non-zero,
or does not finish in time, fails the launch with every rank's output.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], world: int = 2, timeout: float = 240.0) -> None:
    """Run ``script args`` as ``world`` ranks; raise ``AssertionError`` with their output unless all exit 0."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
        PYTHONWARNINGS="ignore",
    )
    procs = []
    for rank in range(world):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env={**env, "LOCAL_RANK": str(rank), "RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs, codes = [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, _ = proc.communicate()
            out += f"\n[timed out after {timeout} s]"
        outputs.append(out)
        codes.append(proc.returncode)
    if any(codes):
        report = "\n".join(f"--- rank {r} exited {c} ---\n{o[-6000:]}" for r, (c, o) in enumerate(zip(codes, outputs)))
        raise AssertionError(f"distributed worker {script.name} failed:\n{report}")


class MemoryLogger:
    """A Lightning logger that keeps logged metrics in memory (built lazily: importing needs no Lightning)."""

    def __new__(cls) -> Any:  # type: ignore[misc]
        from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment

        class _MemoryLogger(Logger):
            def __init__(self) -> None:
                super().__init__()
                self.metrics: list[dict[str, float]] = []

            @property
            def name(self) -> str:
                return "memory"

            @property
            def version(self) -> int:
                return 0

            @property
            @rank_zero_experiment
            def experiment(self) -> None:
                return None

            def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
                self.metrics.append(dict(metrics))

            def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
                pass

        return _MemoryLogger()


def lit_net(case: Any, config: dict[str, Any]) -> Any:
    """The case's network in a LightningModule: loss from the case, optimizer and decay from the config.

    Built lazily so that importing this file needs no Lightning.
    """
    import lightning.pytorch as pl
    import torch

    class LitNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = case.make_net()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return case.loss_fn(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return case.make_optimizer(
                self.parameters(), config.get("optimizer", "sgd"), config.get("weight_decay", 0.0)
            )

    return LitNet()
