"""What exact GC of DTensor gradients communicates and costs, on 2 CPU gloo ranks.

For a GPT-2-small-shaped and a ResNet-50-shaped set of weights, sharded as FSDP2 does (``Shard(0)``) and,
for GPT-2, as Megatron-style tensor parallelism does (``ColwiseParallel`` / ``RowwiseParallel``), it reports:

* the values all-reduced for row sums per step, as a fraction of the model's gradient entries (bytes for
  bytes: the sums are float32 like the gradients here);
* the time of ``DTensorPlan.apply`` (without and with diagnostics) relative to an ``SGD(momentum=0.9)``
  step on the same sharded parameters, both measured in the same process (median of ``--repeats``).

Run: ``python benchmarks/dtensor_gc.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.multiprocessing as mp

Spec = tuple[str, tuple[int, ...], str, int, int]  # name, shape, placement ("S0", "S1", "R"), out_dim, centralize


def gpt2_small(parallel: str) -> list[Spec]:
    """GPT-2 small (124M): 12 blocks, width 768, weights as ``nn.Linear`` (out, in)."""
    col, row = ("S0", "S1") if parallel == "tp" else ("S0", "S0")
    specs: list[Spec] = [("wte", (50257, 768), "S0", 0, 0), ("wpe", (1024, 768), "S0", 0, 0)]
    for i in range(12):
        p = f"h{i}."
        specs += [
            (p + "ln_1", (768,), "R" if parallel == "tp" else "S0", 0, 0),
            (p + "ln_1.bias", (768,), "R" if parallel == "tp" else "S0", 0, 0),
            (p + "attn.c_attn", (2304, 768), col, 0, 1),
            (p + "attn.c_attn.bias", (2304,), "S0", 0, 0),
            (p + "attn.c_proj", (768, 768), row, 0, 1),
            (p + "attn.c_proj.bias", (768,), "R" if parallel == "tp" else "S0", 0, 0),
            (p + "ln_2", (768,), "R" if parallel == "tp" else "S0", 0, 0),
            (p + "ln_2.bias", (768,), "R" if parallel == "tp" else "S0", 0, 0),
            (p + "mlp.c_fc", (3072, 768), col, 0, 1),
            (p + "mlp.c_fc.bias", (3072,), "S0", 0, 0),
            (p + "mlp.c_proj", (768, 3072), row, 0, 1),
            (p + "mlp.c_proj.bias", (768,), "R" if parallel == "tp" else "S0", 0, 0),
        ]
    return specs + [("ln_f", (768,), "S0", 0, 0), ("ln_f.bias", (768,), "S0", 0, 0)]


def resnet50(parallel: str) -> list[Spec]:
    """ResNet-50 (25.6M): bottleneck stages [3, 4, 6, 3], expansion 4; batch-norm pairs as 1-D entries."""
    specs: list[Spec] = [("conv1", (64, 3, 7, 7), "S0", 0, 1), ("bn1", (128,), "S0", 0, 0)]
    inplanes = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}."
            specs += [
                (p + "conv1", (width, inplanes, 1, 1), "S0", 0, 1),
                (p + "bn1", (2 * width,), "S0", 0, 0),
                (p + "conv2", (width, width, 3, 3), "S0", 0, 1),
                (p + "bn2", (2 * width,), "S0", 0, 0),
                (p + "conv3", (4 * width, width, 1, 1), "S0", 0, 1),
                (p + "bn3", (8 * width,), "S0", 0, 0),
            ]
            if b == 0:
                specs += [
                    (p + "downsample", (4 * width, inplanes, 1, 1), "S0", 0, 1),
                    (p + "bn_ds", (8 * width,), "S0", 0, 0),
                ]
            inplanes = 4 * width
    return specs + [("fc", (1000, 2048), "S0", 0, 1), ("fc.bias", (1000,), "S0", 0, 0)]


CONFIGS = {
    "GPT-2 small, FSDP2": (gpt2_small, "fsdp2", "channel"),
    "GPT-2 small, FSDP2, mode=tensor": (gpt2_small, "fsdp2", "tensor"),
    "GPT-2 small, tensor parallel": (gpt2_small, "tp", "channel"),
    "ResNet-50, FSDP2": (resnet50, "fsdp2", "channel"),
}


def _measure(name: str, repeats: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    from lightning_gc.layouts import RowLayout
    from lightning_gc.selection import Target
    from lightning_gc.sharding.dtensor import DTensorPlan

    build, parallel, mode = CONFIGS[name]
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(0)
    params, targets, total = [], [], 0
    for pname, shape, code, out_dim, centralize in build(parallel):
        placement = Replicate() if code == "R" else Shard(int(code[1:]))
        full = torch.randn(shape, generator=gen)
        param = nn.Parameter(distribute_tensor(full, mesh, [placement], src_data_rank=None))
        param.grad = distribute_tensor(torch.randn(shape, generator=gen), mesh, [placement], src_data_rank=None)
        params.append(param)
        total += full.numel()
        if centralize:
            targets.append(Target(param, pname, RowLayout((out_dim,))))
    plan = DTensorPlan(targets, mode)  # type: ignore[arg-type]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    reduced: list[int] = []
    all_reduce = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reduced.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    plan.apply()
    dist.all_reduce = all_reduce
    row_values = sum(reduced)

    def timed(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    optimizer.step()  # allocate the momentum buffers outside the timing
    t_sgd = timed(optimizer.step)
    t_gc = timed(plan.apply)
    t_stats = timed(lambda: plan.apply(compute_stats=True))
    return {"total": total, "row_values": row_values, "sgd": t_sgd, "gc": t_gc, "gc_stats": t_stats}


def _worker(rank: int, port: int, repeats: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    results = {name: _measure(name, repeats) for name in CONFIGS}
    if rank == 0:
        out.put(results)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median)")
    args = parser.parse_args()
    if args.repeats < 1:
        raise ValueError(f"`--repeats` must be a positive integer, got {args.repeats}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, args.repeats, out)) for rank in range(2)]
    for p in procs:
        p.start()
    results = out.get()
    for p in procs:
        p.join()
    print(f"torch {torch.__version__}, 2 gloo ranks on CPU, 1 thread each, median of {args.repeats}")
    header = ("model, layout", "grad entries", "all-reduced/rank", "fraction", "GC/SGD step", "+stats")
    print(f"{header[0]:34} {header[1]:>12} {header[2]:>16} {header[3]:>9} {header[4]:>11} {header[5]:>7}")
    for name, r in results.items():
        fraction = r["row_values"] / r["total"]
        print(
            f"{name:34} {r['total']:>12,} {r['row_values']:>16,} {fraction:>9.2e}"
            f" {r['gc'] / r['sgd']:>11.2f} {r['gc_stats'] / r['sgd']:>7.2f}"
        )


if __name__ == "__main__":
    main()
