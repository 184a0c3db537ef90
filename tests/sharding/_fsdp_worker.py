"""One rank of the FSDP1 tests: trains :mod:`_fsdp_case` under each configuration and saves what it saw.

Run by :func:`_multiprocess.launch` (one process per rank). Not a test module itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


def main(out_dir: str, configs_json: str) -> None:
    import lightning.pytorch as pl
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    import _fsdp_case as case
    from _multiprocess import MemoryLogger, lit_net

    from lightning_gc import GradientCentralization
    from lightning_gc.sharding.fsdp import FlatShardPlan

    rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=case.WORLD)  # Lightning reuses it
    results: dict[str, Any] = {}
    for config in json.loads(configs_json):
        if config.get("functional"):
            results[config["name"]] = _functional_run(case, config, rank)
            continue
        module = lit_net(case, config)
        logger = MemoryLogger()
        gc = GradientCentralization(
            mode=config.get("mode", "channel"),
            exclude=config.get("exclude", ()),
            centralize_weight_decay=bool(config.get("weight_decay")),
        )
        recorders = [_GradRecorder(), _GradRecorder()]
        callbacks = [recorders[0], gc, recorders[1]]
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=case.WORLD,
            strategy=_strategy(config),
            precision=config.get("precision", "32-true"),
            max_steps=case.STEPS,
            accumulate_grad_batches=case.ACCUMULATE,
            callbacks=callbacks,
            logger=logger,
            log_every_n_steps=1,
            use_distributed_sampler=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        loader = torch.utils.data.DataLoader(case.rank_batches(rank), batch_size=None)
        trainer.fit(module, loader)
        plans = gc.plans
        assert len(plans) == 1 and isinstance(plans[0], FlatShardPlan), plans
        results[config["name"]] = {
            "params": _full_params(trainer.strategy.model),
            "metrics": [{k: float(v) for k, v in m.items() if k.startswith("gc/")} for m in logger.metrics],
            "cut_rows": {t.name: len(t.cut_rows) for t in plans[0].targets},
            "generic": {t.name: not t.rows.rows_are_blocks for t in plans[0].targets},
            "bytes_per_step": plans[0].bytes_per_step(compute_stats=True),
            "pre": recorders[0].grads,
            "weights": recorders[0].params,
            "post": recorders[1].grads,
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _functional_run(case: Any, config: dict[str, Any], rank: int) -> dict[str, Any]:
    """A plain PyTorch loop over FSDP1 with `centralize_gradients` (the Fabric / hand-written-loop route)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lightning_gc import centralize_gradients

    model = FullyShardedDataParallel(
        case.Holder(),
        device_id=torch.device("cpu"),
        use_orig_params=config.get("use_orig_params", True),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear, nn.ConvTranspose1d}) if config.get("wrap") else None,
    )
    optimizer = case.make_optimizer(model.parameters(), "sgd", config.get("weight_decay", 0.0))
    metrics = []
    batches = case.rank_batches(rank)
    for step in range(case.STEPS):
        for x, y in batches[step * case.ACCUMULATE : (step + 1) * case.ACCUMULATE]:
            (case.loss_fn(model(x), y) / case.ACCUMULATE).backward()
        stats = centralize_gradients(
            model, optimizer=optimizer, centralize_weight_decay=bool(config.get("weight_decay")), compute_stats=True
        )
        metrics.append(
            {"gc/grad_norm": float(stats.grad_norm), "gc/removed_norm_ratio": float(stats.removed_norm_ratio)}
        )
        optimizer.step()
        optimizer.zero_grad()
    return {"params": _full_params(model), "metrics": metrics}


class _GradRecorder:  # built lazily so that importing this file needs no Lightning
    """Records the full (unsharded) gradients at ``on_before_optimizer_step``, gathered by FSDP's own code.

    ``use_orig_params=True``: ``summon_full_params(with_grads=True)``. ``False`` (which that does not
    support): the flat gradient shards all-gathered and split by FSDP's ``_get_unflat_views``.
    """

    def __new__(cls):  # type: ignore[misc]
        from lightning.pytorch.callbacks import Callback

        class GradRecorder(Callback):
            def __init__(self) -> None:
                self.grads: list[dict[str, torch.Tensor]] = []
                self.params: list[dict[str, torch.Tensor]] = []

            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
                self.grads.append(_full_grads(trainer.strategy.model))
                self.params.append(_full_params(trainer.strategy.model))

        return GradRecorder()


def _full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    if model._use_orig_params:
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, with_grads=True):
            return {_clean(n): p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads = {}
    for prefix, fsdp_module in model.named_modules():
        handle = getattr(fsdp_module, "_handle", None) if isinstance(fsdp_module, FullyShardedDataParallel) else None
        if handle is None or handle.flat_param.grad is None:
            continue
        flat_param, shard = handle.flat_param, handle.flat_param.grad
        full = shard
        if handle.uses_sharded_strategy:
            full = torch.empty(shard.numel() * handle.world_size, dtype=shard.dtype)
            dist.all_gather_into_tensor(full, shard.contiguous(), group=handle.process_group)
        full = full[: flat_param._unpadded_unsharded_size.numel()]
        for fqn, view in zip(flat_param._fqns, handle._get_unflat_views(full)):
            grads[_clean(f"{prefix}.{fqn}" if prefix else fqn)] = view.double().clone()
    return grads


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").removeprefix("net.")


def _strategy(config: dict[str, Any]) -> Any:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    class CPUFSDPStrategy(FSDPStrategy):
        """FSDPStrategy on CPU: FSDP1 needs `device_id=cpu` there, which Lightning never passes."""

        def setup_environment(self) -> None:
            mesh = self.kwargs.pop("device_mesh", None)  # Lightning would build a tuple mesh on CUDA
            super().setup_environment()
            if mesh is not None:
                from torch.distributed.device_mesh import init_device_mesh

                self.kwargs["device_mesh"] = init_device_mesh("cpu", tuple(mesh), mesh_dim_names=("replicate", "shard"))

        def _setup_model(self, model: nn.Module) -> nn.Module:
            return FullyShardedDataParallel(
                module=model,
                sharding_strategy=self.sharding_strategy,
                mixed_precision=self.mixed_precision_config,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )

    kwargs: dict[str, Any] = {}
    if config.get("wrap"):
        kwargs["auto_wrap_policy"] = ModuleWrapPolicy({nn.Conv1d, nn.ConvTranspose1d, nn.Linear})
    if config.get("mesh"):
        kwargs["device_mesh"] = tuple(config["mesh"])
    if config.get("mixed_precision"):
        param, reduce = (getattr(torch, d) for d in config["mixed_precision"])
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=param, reduce_dtype=reduce)
    return CPUFSDPStrategy(
        sharding_strategy=config.get("sharding", "FULL_SHARD"),
        use_orig_params=config.get("use_orig_params", True),
        process_group_backend="gloo",
        **kwargs,
    )


def _full_params(model: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        params = {_clean(name): p.detach().double().clone() for name, p in model.named_parameters()}
    return params


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
