"""One rank of the DeepSpeed tests: trains :mod:`_fsdp_case` under ZeRO-1/2 on CPU and saves what it saw.

Lightning's ``DeepSpeedStrategy`` refuses non-CUDA accelerators; :func:`_strategy` lifts that check and
skips DeepSpeed's shared-memory all-reduce extension (a C++ build of minutes; gloo does the same work).
Run by :func:`_multiprocess.launch`. Not a test module itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def main(out_dir: str, configs_json: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm.torch  # noqa: F401
    import lightning.pytorch as pl
    import torch.distributed as dist

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    sys.path.insert(0, str(Path(__file__).parent))
    import _fsdp_case as case
    from _multiprocess import MemoryLogger, lit_net

    from lightning_gc import GradientCentralization
    from lightning_gc.sharding.deepspeed import ZeroPlan

    rank = int(os.environ["LOCAL_RANK"])
    results: dict[str, Any] = {}
    for config in json.loads(configs_json):
        logger = MemoryLogger()
        gc = GradientCentralization(
            mode=config.get("mode", "channel"), centralize_weight_decay=bool(config.get("weight_decay"))
        )
        recorders = [_FullGradRecorder(), _FullGradRecorder()]
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=case.WORLD,
            strategy=_strategy(config),
            precision=config.get("precision", "32-true"),
            max_epochs=config.get("epochs", 1),
            accumulate_grad_batches=case.ACCUMULATE,
            callbacks=[recorders[0], gc, recorders[1]],
            logger=logger,
            log_every_n_steps=1,
            use_distributed_sampler=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        loader = torch.utils.data.DataLoader(case.rank_batches(rank)[: config.get("batches")], batch_size=None)
        trainer.fit(lit_net(case, config), loader)
        plans = gc.plans
        assert len(plans) == 1 and isinstance(plans[0], ZeroPlan), plans
        engine = trainer.strategy.model
        results[config["name"]] = {
            "params": {n.removeprefix("net."): _full_param(p) for n, p in engine.module.named_parameters()},
            "metrics": [{k: float(v) for k, v in m.items() if k.startswith("gc/")} for m in logger.metrics],
            "cut_rows": {t.name: len(t.cut_rows) for t in plans[0].targets},
            "pre": recorders[0].grads,
            "post": recorders[1].grads,
            "weights": recorders[0].weights,
            "bytes_per_step": plans[0].bytes_per_step(compute_stats=True),
            "optimizer_steps": gc.optimizer_steps,
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _strategy(config: dict[str, Any]) -> Any:
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeedStrategy without its CUDA-only checks."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:  # the parent validates CUDA device indices first
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
            import argparse

            import deepspeed

            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),  # the parent passes the CUDA index: None
                config=self.config,
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
            return engine, ds_optimizer

    strategy = CPUDeepSpeedStrategy(stage=config["stage"], process_group_backend="gloo")
    strategy.config["train_micro_batch_size_per_gpu"] = 3  # Lightning would read it off a batch sampler
    return strategy


def _full_param(param: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param).double().clone()


class _FullGradRecorder:  # built lazily so that importing this file needs no Lightning
    """At accumulation boundaries, the full gradients (and weights) as DeepSpeed itself assembles them."""

    def __new__(cls) -> Any:  # type: ignore[misc]
        from deepspeed.utils import safe_get_full_grad
        from lightning.pytorch.callbacks import Callback

        class FullGradRecorder(Callback):
            def __init__(self) -> None:
                self.grads: list[dict[str, torch.Tensor]] = []
                self.weights: list[dict[str, torch.Tensor]] = []

            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
                engine = trainer.strategy.model
                if not engine.is_gradient_accumulation_boundary():
                    return
                params = list(engine.module.named_parameters())
                self.grads.append({n.removeprefix("net."): safe_get_full_grad(p).double().clone() for n, p in params})
                self.weights.append({n.removeprefix("net."): _full_param(p) for n, p in params})

        return FullGradRecorder()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
