"""What each rank of a :class:`dist_pool.DistPool` runs for tests/update/test_update_distributed.py.

Every function returns plain numpy arrays, floats and strings; the parent compares them with float64
references computed in one process. Full tensors are gathered here, in the tests only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Layer:
    """One weight, its DTensor placement on a 2-rank mesh, and the module type that gives its layout."""

    kind: str  # "linear", "conv" (Conv1d), "transposed" (ConvTranspose1d)
    shape: tuple[int, ...]
    placement: str  # "S<d>" Shard(d), "R" Replicate
    groups: int = 1
    mode: str = "channel"
    dtype: str = "float64"

    def module(self) -> nn.Module:
        s = self.shape
        if self.kind == "linear":
            return nn.Linear(s[1], s[0], bias=False)
        if self.kind == "conv":
            return nn.Conv1d(s[1], s[0], s[2], bias=False)
        return nn.ConvTranspose1d(s[0], s[1] * self.groups, s[2], groups=self.groups, bias=False)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full weight and change, float64; the change has a non-zero mean along every axis."""
        gen = torch.Generator().manual_seed(11)
        weight = torch.randn(self.shape, generator=gen, dtype=torch.float64)
        change = 0.01 * torch.randn(self.shape, generator=gen, dtype=torch.float64)
        for dim, size in enumerate(self.shape):
            change = change + torch.linspace(-0.02, 0.05, size, dtype=torch.float64).view(
                [-1 if d == dim else 1 for d in range(len(self.shape))]
            )
        return weight, change


class _AddChange(torch.optim.Optimizer):
    def __init__(self, params: Any, change: Any) -> None:
        super().__init__(params, {})
        self.change = change

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(self.change)


def dtensor_layer(layer: Layer) -> dict[str, Any]:
    """Step a DTensor weight by a known change with the update placement; report it and what was all-reduced."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    from lightning_gc.config import GCConfig
    from lightning_gc.sharding.guard import UnsupportedGradientLayoutError
    from lightning_gc.update import UpdatePlan

    mesh = init_device_mesh("cpu", (2,))
    placement = Replicate() if layer.placement == "R" else Shard(int(layer.placement[1:]))
    dtype = DTYPES[layer.dtype]
    weight, change = (t.to(dtype) for t in layer.tensors())
    module = layer.module()
    module.weight = nn.Parameter(distribute_tensor(weight, mesh, [placement], src_data_rank=None))
    optimizer = _AddChange(module.parameters(), distribute_tensor(change, mesh, [placement], src_data_rank=None))
    reduced: list[int] = []
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reduced.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    try:
        plan = UpdatePlan.for_optimizer(optimizer, module, GCConfig(mode=layer.mode))  # type: ignore[arg-type]
    except UnsupportedGradientLayoutError as error:
        return {"error": str(error)}
    dist.all_reduce = counting
    try:
        plan.record()
        optimizer.step()
        plan.correct()
    finally:
        dist.all_reduce = original
    return {"weight": module.weight.detach().full_tensor().double().numpy(), "reduced": reduced}


# ----------------------------------------------------------------------------------------- Trainer runs


def _trainer(strategy: Any, precision: str, steps: int, callbacks: list[Any]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=torch.distributed.get_world_size(),
        strategy=strategy,
        precision=precision,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def ddp_fit(steps: int, lr: float, weight_decay: float) -> dict[str, np.ndarray]:
    """TinyModule (Adam, coupled decay) under DDP in 64-true, each rank on its own batches."""
    from models import TinyModule, loader, make_batches

    from lightning_gc import GradientCentralization

    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    module = TinyModule("adam", lr=lr, weight_decay=weight_decay)
    rank = torch.distributed.get_rank()
    own = make_batches(2 * steps)[rank::2]
    trainer = _trainer("ddp", "64-true", steps, [GradientCentralization(apply_to="update")])
    trainer.fit(module, loader(own))
    return {n: p.detach().double().numpy().copy() for n, p in module.net.named_parameters()}


class _ParallelModule(pl.LightningModule):
    """A dtensor_scenarios net sharded by FSDP2 or tensor parallel, trained with Adam and coupled decay."""

    def __init__(self, net: nn.Module, layout: str, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.net, self.layout, self.lr, self.weight_decay = net, layout, lr, weight_decay

    def configure_model(self) -> None:
        from dtensor_scenarios import _fully_shard, _tensor_parallel

        if self.layout == "tp":
            _tensor_parallel(self.net, self.device_mesh["tensor_parallel"])
        else:
            _fully_shard(self, self.device_mesh["data_parallel"], mp_policy=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def parallel_fit(layout: str, steps: int, lr: float, weight_decay: float, kwargs: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 (``layout="fsdp2"``, data parallel 2) or tensor parallel (``"tp"``) with the update placement."""
    from dtensor_scenarios import ConvNet, TPNet, conv_data, seeded, token_data
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_gc import GradientCentralization

    net = seeded(ConvNet if layout == "fsdp2" else TPNet)
    module = _ParallelModule(net, layout, lr, weight_decay)
    data_parallel = 2 if layout == "fsdp2" else 1
    strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=2 // data_parallel)
    gc = GradientCentralization(apply_to="update", **kwargs)
    trainer = _trainer(strategy, "32-true", steps, [gc])
    data = (conv_data if layout == "fsdp2" else token_data)(3 * steps * data_parallel)
    own = data[torch.distributed.get_rank() :: 2] if data_parallel == 2 else data
    trainer.fit(module, torch.utils.data.DataLoader(own, batch_size=3, shuffle=False))
    weights = {}
    for name, p in module.net.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        weights[name] = full.detach().double().numpy().copy()
    return {"weights": weights, "steps": gc.optimizer_steps}


def fsdp1_fit(config: dict[str, Any], steps: int, lr: float, weight_decay: float) -> dict[str, Any]:
    """TinyModule (Adam, coupled decay) under FSDP1 on CPU (tests/sharding/_fsdp_worker's strategy)."""
    from _fsdp_worker import _full_params, _strategy
    from models import TinyModule, loader, make_batches

    from lightning_gc import GradientCentralization

    torch.manual_seed(0)
    module = TinyModule("adam", lr=lr, weight_decay=weight_decay)
    own = make_batches(2 * steps)[torch.distributed.get_rank() :: 2]
    gc = GradientCentralization(apply_to="update")
    plans: list[Any] = []

    class KeepPlans(pl.Callback):  # the hooks are removed at teardown: keep their plans for the checks
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            plans.extend(h.plan for h in gc._update.handles)  # type: ignore[union-attr]

    trainer = _trainer(_strategy(config), "32-true", steps, [gc, KeepPlans()])
    trainer.fit(module, loader(own))
    cut = sum(group.group.grad_slots for plan in plans for group in plan.pieces)
    assert plans and all(not plan.weights and plan.pieces for plan in plans)  # every weight through its shards
    return {"weights": {k: v.numpy() for k, v in _full_params(trainer.strategy.model).items()}, "cut_rows": cut}


def fsdp1_functional(steps: int, lr: float) -> dict[str, np.ndarray]:
    """centralize_updates on a bare FullyShardedDataParallel module (one flat parameter for the whole net)."""
    from _fsdp_worker import _full_params
    from models import TinyConvNet, make_batches
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_gc import centralize_updates

    torch.manual_seed(0)
    wrapped = FullyShardedDataParallel(TinyConvNet(), device_id=torch.device("cpu"), use_orig_params=False)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=lr)
    handle = centralize_updates(wrapped, optimizer)
    for x, y in make_batches(2 * steps)[torch.distributed.get_rank() :: 2]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
    handle.remove()
    return {k: v.numpy() for k, v in _full_params(wrapped).items()}
