"""What exact GC costs under FSDP1: bytes all-reduced per step, and step time against no GC.

Communication comes from the plans themselves (:meth:`FlatShardPlan.bytes_per_step`), built on real
FSDP1 models (FULL_SHARD, one FSDP unit per transformer block / bottleneck, ``use_orig_params=True``) of
GPT-2-small and ResNet-50 shape. World sizes above the real one use PyTorch's ``fake`` process group in
one process: FSDP shards exactly as it would, and the plan's buffer layout depends on nothing else.

Step time is measured on ``--world`` real CPU ranks (gloo): the same FSDP model and batch, steps with and
without GC interleaved, medians compared within one run.

Usage:
    python benchmarks/fsdp_comm.py                        # bytes for world 2, 8, 64; step time on 2 ranks
    python benchmarks/fsdp_comm.py --bytes-only --worlds 2 8 64 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gc.config import GCConfig
from lightning_gc.sharding.fsdp import FlatShardPlan

# ---- the two parameter sets ----------------------------------------------------------------------------


class Block(nn.Module):
    """A GPT-2 transformer block (pre-LN attention + 4x MLP)."""

    def __init__(self, width: int = 768, heads: int = 12) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.c_fc, self.mlp_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(c, 2)
        )
        x = x + self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2Small(nn.Module):
    """GPT-2 small's parameter set (124M; the LM head tied to the token embedding)."""

    def __init__(self, vocab: int = 50257, context: int = 1024, width: int = 768, depth: int = 12) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck block."""

    def __init__(self, inp: int, width: int, stride: int) -> None:
        super().__init__()
        out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(inp, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.down = None
        if stride != 1 or inp != out:
            self.down = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """ResNet-50's parameter set (25.6M)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        blocks, inp = [], 64
        for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(count):
                blocks.append(Bottleneck(inp, width, stride if i == 0 else 1))
                inp = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, classes)

    def forward(self, images: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(images))), 3, 2, 1)
        logits = self.fc(self.blocks(x).mean(dim=(2, 3)))
        return F.cross_entropy(logits, torch.zeros(len(images), dtype=torch.long))


MODELS: dict[str, tuple[Callable[[], nn.Module], type[nn.Module], Callable[[int], Tensor]]] = {
    "gpt2-small": (
        GPT2Small,
        Block,
        lambda seed: torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(seed)),
    ),
    "resnet50": (
        ResNet50,
        Bottleneck,
        lambda seed: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)),
    ),
}


def wrap(name: str, use_orig_params: bool = True) -> tuple[nn.Module, FlatShardPlan, torch.optim.Optimizer]:
    """The model under FSDP1 FULL_SHARD on the current process group, with its GC plan and optimizer."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    build, unit, _ = MODELS[name]
    torch.manual_seed(0)
    model = FullyShardedDataParallel(
        build(),
        auto_wrap_policy=ModuleWrapPolicy({unit}),
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    plan = FlatShardPlan.for_optimizer(optimizer, model, model, GCConfig(), warn=lambda message: None)
    return model, plan, optimizer


# ---- bytes per step ------------------------------------------------------------------------------------


def bytes_table(worlds: list[int]) -> list[dict[str, object]]:
    """Per model and world size: bytes all-reduced per step against the model's gradient bytes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    rows = []
    for world in worlds:
        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        try:
            for name in MODELS:
                model, plan, _ = wrap(name)
                grad_bytes = _gradient_numel(model) * 4
                rows.append(
                    {
                        "model": name,
                        "world": world,
                        "grad_MB": grad_bytes / 1e6,
                        "gc_rows": sum(t.rows.rows for t in plan.targets),
                        "cut_rows": sum(len(t.cut_rows) for t in plan.targets),
                        "bytes": plan.bytes_per_step(compute_stats=False),
                        "bytes_with_stats": plan.bytes_per_step(compute_stats=True),
                        "fraction": plan.bytes_per_step(compute_stats=True) / grad_bytes,
                    }
                )
                del model, plan
        finally:
            dist.destroy_process_group()
    return rows


def _gradient_numel(model: nn.Module) -> int:
    """Entries of one step's full gradient: every FlatParameter's unsharded size without padding."""
    from lightning_gc.sharding.fsdp import fsdp_handles

    return sum(sum(h.flat_param._numels) for h in fsdp_handles(model))


# ---- step time -----------------------------------------------------------------------------------------


def _time_rank(rank: int, world: int, port: int, names: list[str], steps: int, queue: object) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in names:
            model, plan, optimizer = wrap(name)
            batch = MODELS[name][2](rank)
            times: dict[str, list[float]] = {"off": [], "on": [], "apply": []}
            for step in range(steps + 1):  # step 0 warms up both arms
                for arm in ("off", "on"):
                    dist.barrier()
                    start = time.perf_counter()
                    model(batch).backward()
                    if arm == "on":
                        t0 = time.perf_counter()
                        plan.apply()
                        applied = time.perf_counter() - t0
                    optimizer.step()
                    optimizer.zero_grad()
                    dist.barrier()
                    if step:
                        times[arm].append(time.perf_counter() - start)
                        if arm == "on":
                            times["apply"].append(applied)
            if rank == 0:
                queue.put((name, {k: statistics.median(v) for k, v in times.items()}))  # type: ignore[attr-defined]
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_time(world: int, steps: int, names: list[str]) -> list[tuple[str, dict[str, float]]]:
    """Median step time without and with GC, and of ``plan.apply`` alone, on ``world`` gloo ranks."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_time_rank, args=(world, _free_port(), names, steps, queue), nprocs=world, start_method="spawn")
    return [queue.get() for _ in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 8, 64], help="world sizes for the bytes table")
    parser.add_argument("--world", type=int, default=2, help="real CPU ranks for the step-time measurement")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm (after one warm-up)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bytes-only", action="store_true", help="skip the step-time measurement")
    args = parser.parse_args()
    if min(args.worlds) < 2 or args.world < 2 or args.steps < 1:
        parser.error("`--worlds`/`--world` need at least 2 ranks and `--steps` at least 1")

    print(f"torch {torch.__version__}, FSDP1 FULL_SHARD, use_orig_params=True, one FSDP unit per block\n")
    print("| model | world | gradient MB | GC rows | cut rows | bytes/step | with stats | fraction of gradient bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in bytes_table(args.worlds):
        if row["model"] in args.models:
            print(
                f"| {row['model']} | {row['world']} | {row['grad_MB']:.1f} | {row['gc_rows']} | {row['cut_rows']} |"
                f" {row['bytes']} | {row['bytes_with_stats']} | {row['fraction']:.2e} |"
            )
    if args.bytes_only:
        return
    print(f"\nStep time on {args.world} CPU ranks (gloo, 1 thread each), median of {args.steps} steps per arm:\n")
    print("| model | step without GC (s) | step with GC (s) | GC apply (s) | apply / step | measured overhead |")
    print("|---|---|---|---|---|---|")
    for name, t in measure_time(args.world, args.steps, args.models):
        print(
            f"| {name} | {t['off']:.3f} | {t['on']:.3f} | {t['apply']:.4f} | {t['apply'] / t['off']:.2%} |"
            f" {(t['on'] - t['off']) / t['off']:+.2%} |"
        )


if __name__ == "__main__":
    main()
