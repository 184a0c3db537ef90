"""What each rank of a :class:`dist_pool.DistPool` runs for tests/sharding/test_dtensor.py.

Every function returns plain numpy arrays and floats, so the parent compares them with float64 references
computed in one process. Gathering full tensors (``full_tensor()``) happens here, in the tests only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

MOMENTUM = 0.9
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- adapter cases


@dataclass(frozen=True)
class Case:
    """One gradient layout for the adapter, described so that the parent can build the reference.

    ``grad`` and ``param`` are placements, one per mesh dim: ``"S<d>"`` Shard(d), ``"SS<d>"``
    _StridedShard(d, split_factor=2) (FSDP2 over tensor parallel), ``"R"`` Replicate, ``"P"`` Partial(sum).
    ``"plain"`` as ``grad`` means an ordinary tensor on every rank (a module left unsharded).
    """

    shape: tuple[int, ...]
    grad: tuple[str, ...]
    mesh: tuple[int, ...] = (2,)
    param: tuple[str, ...] | None = None
    out_dim: int = 0
    groups: int = 1
    mode: str = "channel"
    dtype: str = "float32"
    decay: float = 0.0
    seed: int = 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full gradient and weight in float64, rows offset so that every row mean is far from zero."""
        gen = torch.Generator().manual_seed(self.seed)
        grad = torch.randn(self.shape, generator=gen, dtype=torch.float64)
        offsets = torch.randn(self.shape[self.out_dim], generator=gen, dtype=torch.float64)
        view = [1] * len(self.shape)
        view[self.out_dim] = -1
        weight = torch.randn(self.shape, generator=gen, dtype=torch.float64)
        return grad + offsets.view(view), weight


def _placement(code: str) -> Any:
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if code == "R":
        return Replicate()
    if code == "P":
        return Partial()
    if code.startswith("SS"):
        return _StridedShard(int(code[2:]), split_factor=2)
    return Shard(int(code[1:]))


def _distribute(full: torch.Tensor, mesh: Any, codes: tuple[str, ...]) -> Any:
    """``full`` as a DTensor; a ``Partial`` mesh dim holds ``(c + 1) / sum`` of it on coordinate ``c``."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    placements = [_placement(c) for c in codes]
    # every rank holds `full`: split it locally (src_data_rank=None), no scatter
    unreduced = [Replicate() if p.is_partial() else p for p in placements]
    dense = distribute_tensor(full, mesh, unreduced, src_data_rank=None)
    local = dense.to_local().clone()
    for mesh_dim, p in enumerate(placements):
        if p.is_partial():
            n, c = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
            local *= (c + 1) / (n * (n + 1) / 2)
    return DTensor.from_local(local, mesh, placements, shape=full.shape, stride=full.stride())


def adapter_case(case: Case) -> dict[str, Any]:
    """Centralize ``case``'s gradient with :class:`DTensorPlan`; report it, the stats and the communication."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from lightning_gc.layouts import RowLayout
    from lightning_gc.selection import Target
    from lightning_gc.sharding.dtensor import DTensorPlan
    from lightning_gc.sharding.guard import UnsupportedGradientLayoutError

    dtype = DTYPES[case.dtype]
    mesh = init_device_mesh("cpu", case.mesh)
    grad, weight = (t.to(dtype) for t in case.tensors())
    if case.grad == ("plain",):
        param = nn.Parameter(weight.clone())
        param.grad = grad.clone()
    else:
        param_codes = case.param or tuple("R" if c == "P" else c for c in case.grad)
        param = nn.Parameter(_distribute(weight, mesh, param_codes))
        param.grad = _distribute(grad, mesh, case.grad)
    target = Target(param, "layer.weight", RowLayout((case.out_dim,), case.groups), case.decay)
    plan = DTensorPlan([target], case.mode)  # type: ignore[arg-type]

    reduced: list[int] = []
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reduced.append(tensor.numel())
        return original_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        with CommDebugMode() as comm:
            stats = plan.apply(compute_stats=True)
    except UnsupportedGradientLayoutError as error:  # raised on every rank before any collective
        return {"error": str(error)}
    finally:
        dist.all_reduce = original_all_reduce
    out = param.grad
    return {
        "grad": (out.full_tensor() if isinstance(out, DTensor) else out).double().numpy(),
        "placements": str(getattr(out, "placements", "plain")),
        "row_elements": sum(reduced[:-1]),  # the last all-reduce is the two diagnostics numbers
        "stats_elements": reduced[-1] if reduced else 0,
        "collectives": {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()},
        "grad_sq": float(stats.grad_sq),
        "removed_sq": float(stats.removed_sq),
        "tensors": stats.tensors,
        "elements": stats.elements,
    }


class Conv1D(nn.Module):
    """A stand-in named like ``transformers.pytorch_utils.Conv1D`` (GPT-2): weight stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


Conv1D.__module__ = "transformers.pytorch_utils"


def registry_layers() -> nn.Module:
    """A GPT-2-style Conv1D and a weight-norm-parametrized linear layer, as the layout registry sees them."""
    torch.manual_seed(0)
    return nn.Sequential(Conv1D(5, 7), nn.utils.parametrizations.weight_norm(nn.Linear(6, 5)))


def registry_layers_grads() -> dict[str, torch.Tensor]:
    """Float64 gradients with a different non-zero mean along every axis, by parameter name."""
    gen = torch.Generator().manual_seed(3)
    grads = {}
    for name, p in registry_layers().named_parameters():
        grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        for d in range(grad.ndim):
            view = [1] * grad.ndim
            view[d] = -1
            grad = grad + 2 * torch.randn(grad.shape[d], generator=gen, dtype=torch.float64).view(view)
        grads[name] = grad
    return grads


def registry_layers_case(placement: str) -> dict[str, Any]:
    """Shard every parameter with ``placement`` and centralize through the DTensor adapter's own selection."""
    from torch.distributed.tensor import DTensor, init_device_mesh

    from lightning_gc.config import GCConfig
    from lightning_gc.sharding.dtensor import DTensorAdapter

    mesh = init_device_mesh("cpu", (2,))
    model = registry_layers()
    grads = registry_layers_grads()
    for name, p in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        codes = (placement,) if p.ndim > int(placement[1:]) else ("R",)
        param = nn.Parameter(_distribute(p.detach().double().float(), mesh, codes))
        param.grad = _distribute(grads[name].float(), mesh, codes)
        model.get_submodule(owner).register_parameter(attr, param)
    plan = DTensorAdapter().build_plan(GCConfig(), module=model)
    plan.apply()
    return {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).double().numpy()
        for n, p in model.named_parameters()
    }


# --------------------------------------------------------------------------------------------- Trainer runs


def seeded(cls: type[nn.Module]) -> nn.Module:
    """``cls()`` initialized from a fixed seed, identical in every process (the reference's too)."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return cls()


class ConvNet(nn.Module):
    """For FSDP2: odd row counts (uneven shards) and every GC path.

    ``conv`` and ``head`` keep whole rows per rank (``Shard(0)``, no communication); ``up`` is a transposed
    convolution whose sharded dim 0 is reduced (row sums all-reduced); ``gup`` is grouped (groups=3, blocks
    of 2 input channels) with 6 input channels split 3/3, so block 1 straddles the two ranks.
    """

    LAYOUTS = {"conv.weight": (0, 1), "up.weight": (1, 1), "gup.weight": (1, 3), "head.weight": (0, 1)}

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3)
        self.up = nn.ConvTranspose1d(5, 6, 3)
        self.gup = nn.ConvTranspose1d(6, 6, 2, groups=3)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(x))
        x = torch.tanh(self.gup(torch.tanh(self.up(x))))
        return self.head(x.mean(dim=2))


class TPNet(nn.Module):
    """For tensor parallel: an embedding (grad ``Replicate``, weight ``Shard(0)``), column- and row-wise pairs.

    ``fc1``/``fc2`` are a Colwise/Rowwise pair (``fc2``'s grad is ``Shard(1)``); ``fc3`` is Colwise with 7
    rows split 4/3 and a replicated output; ``fc4`` is Rowwise on a replicated input, 7 columns split 4/3.
    """

    LAYOUTS = {n: (0, 1) for n in ("emb.weight", "fc1.weight", "fc2.weight", "fc3.weight", "fc4.weight")}

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)
        self.fc3 = nn.Linear(5, 7)
        self.fc4 = nn.Linear(7, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        x = self.fc2(torch.tanh(self.fc1(x)))
        return self.fc4(torch.tanh(self.fc3(x))).mean(dim=1)


def conv_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(3, 8, generator=gen), torch.randint(0, 3, (), generator=gen)) for _ in range(n)]


def token_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(8)
    return [(torch.randint(0, 11, (4,), generator=gen), torch.randint(0, 3, (), generator=gen)) for _ in range(n)]


@dataclass(frozen=True)
class Run:
    """One ``Trainer.fit`` under ``ModelParallelStrategy``, 3 samples per micro-batch."""

    layout: str  # "fsdp2" (data_parallel=2), "tp" (tensor_parallel=2) or "2d" (FSDP2 over TP, 2 x 2 ranks)
    precision: str = "32-true"
    accumulate: int = 1
    steps: int = 2
    weight_decay: float = 0.0
    gc: bool = True
    gc_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 3
    lr: float = 0.1
    mp_policy: bool = False  # FSDP2's own mixed precision: bf16 compute copies, float32 gradient reduction

    @property
    def half_precision(self) -> bool:
        """Whether forward and backward compute in bfloat16 or float16."""
        return self.precision != "32-true" or self.mp_policy

    @property
    def data_parallel(self) -> int:
        return 1 if self.layout == "tp" else 2

    @property
    def tensor_parallel(self) -> int:
        return 1 if self.layout == "fsdp2" else 2

    @property
    def net(self) -> type[nn.Module]:
        return ConvNet if self.layout == "fsdp2" else TPNet

    def data(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return (conv_data if self.layout == "fsdp2" else token_data)(self.samples)

    @property
    def samples(self) -> int:
        return self.steps * self.accumulate * self.batch_size * self.data_parallel


def fit(run: Run) -> dict[str, Any]:
    """Train under ``run``; return the final full weights, the gradients around GC and the logged diagnostics."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_gc import GradientCentralization

    module = _Module(seeded(run.net), run)
    before, after, logger = _GradRecorder(), _GradRecorder(), _RecordingLogger()
    callbacks: list[Any] = [before, after]
    if run.gc:
        callbacks.insert(1, GradientCentralization(**run.gc_kwargs))
    strategy = ModelParallelStrategy(data_parallel_size=run.data_parallel, tensor_parallel_size=run.tensor_parallel)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=torch.distributed.get_world_size(),
        strategy=strategy,
        precision=run.precision,
        max_steps=run.steps,
        accumulate_grad_batches=run.accumulate,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    # sample i goes to data-parallel rank i % ranks, in order (Lightning's sampler would shuffle)
    data_rank = torch.distributed.get_rank() // run.tensor_parallel  # the mesh is (data, tensor), row-major
    own = run.data()[data_rank :: run.data_parallel]
    trainer.fit(module, torch.utils.data.DataLoader(own, batch_size=run.batch_size, shuffle=False))
    return {
        "weights": {n: _full(p) for n, p in module.net.named_parameters()},
        "before": before.seen,
        "after": after.seen,
        "metrics": logger.metrics,
        "grad_placements": before.placements,
    }


class _Module(pl.LightningModule):
    def __init__(self, net: nn.Module, run: Run) -> None:
        super().__init__()
        self.net = net
        self.run = run

    def configure_model(self) -> None:
        if self.run.tensor_parallel > 1:
            _tensor_parallel(self.net, self.device_mesh["tensor_parallel"])
        if self.run.data_parallel > 1:
            _fully_shard(self, self.device_mesh["data_parallel"], self.run.mp_policy)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.run.lr, momentum=MOMENTUM, weight_decay=self.run.weight_decay)


def _fully_shard(module: nn.Module, mesh: Any, mp_policy: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mp_policy": MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32)} if mp_policy else {}
    for layer in module.net.children():
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(module, mesh=mesh, **kwargs)


def _tensor_parallel(net: nn.Module, mesh: Any) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {
        "emb": RowwiseParallel(),
        "fc1": ColwiseParallel(),
        "fc2": RowwiseParallel(),
        "fc3": ColwiseParallel(output_layouts=Replicate()),
        "fc4": RowwiseParallel(input_layouts=Replicate()),
    }
    parallelize_module(net, mesh, plan)


def _full(tensor: torch.Tensor) -> np.ndarray:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().double().numpy().copy()


class _GradRecorder(pl.Callback):
    """Full gradients (and weights) of the net at ``on_before_optimizer_step``, on every rank."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.placements: dict[str, str] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = {}
        for name, p in pl_module.net.named_parameters():
            if p.grad is not None:
                step[name] = _full(p.grad)
                step["weight:" + name] = _full(p)
                self.placements[name] = str(getattr(p.grad, "placements", "plain"))
        self.seen.append(step)


class _RecordingLogger(Logger):
    """Keeps every logged metric, on every rank (Lightning's own loggers write on rank 0 only)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append({k: float(v) for k, v in metrics.items()})


def fabric_loop(run: Run) -> dict[str, Any]:
    """A Fabric loop under ``ModelParallelStrategy`` (tensor parallel) calling ``centralize_gradients``."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel

    from lightning_gc import centralize_gradients

    def parallelize(net: nn.Module, mesh: Any) -> nn.Module:
        _tensor_parallel(net, mesh["tensor_parallel"])
        return net

    strategy = FabricModelParallel(parallelize, data_parallel_size=1, tensor_parallel_size=2)
    fabric = Fabric(accelerator="cpu", devices=torch.distributed.get_world_size(), strategy=strategy)
    fabric.launch()
    net = fabric.setup(seeded(run.net))
    optimizer = fabric.setup_optimizers(
        torch.optim.SGD(net.parameters(), lr=run.lr, momentum=MOMENTUM, weight_decay=run.weight_decay)
    )
    data = run.data()
    per_step = len(data) // run.steps
    stats = []
    for step in range(run.steps):
        x, y = (torch.stack(t) for t in zip(*data[step * per_step : (step + 1) * per_step]))
        optimizer.zero_grad()
        fabric.backward(nn.functional.cross_entropy(net(x), y))
        result = centralize_gradients(net, optimizer=optimizer, compute_stats=True, **run.gc_kwargs)
        stats.append({"ratio": float(result.removed_norm_ratio), "norm": float(result.grad_norm)})
        optimizer.step()
    return {"weights": {n: _full(p) for n, p in net.module.named_parameters()}, "stats": stats}
