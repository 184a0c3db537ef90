"""Everything that needs a GPU, in one run of a few minutes: ``make gpu-check`` (or ``python benchmarks/gpu_check.py``).

On a CUDA machine it runs the CUDA-only checks, each against a float64 reference written here:

- fp16 AMP with a real ``GradScaler`` (functional API after ``unscale_``, and the callback under
  ``Trainer(precision="16-mixed")``);
- bfloat16 gradients on the eager routes;
- the Triton kernel (``lightning_gc.triton_kernel``) in float32, float64, float16 and bfloat16 (bfloat16
  against its documented rounding: float32 row means, one round-to-nearest-even), with launches per call;
- CUDA graph capture and replay of a step with static gradients (``zero_grad(set_to_none=False)``), on the
  eager routes and the Triton route;
- DDP and FSDP2 (``fully_shard``) over NCCL on the available GPUs (one or two processes);

then prints the benchmark table (``bench_gc.py --device cuda``: launches per call, time against a
device-to-device copy of the gradients) and the Triton route's table. Exit status 0 when every check
passed. Without CUDA it says so and exits with status 2, having checked nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import Clock, interleaved_medians, kernel_launches, paired_ratio
from param_sets import PARAM_SETS, ParameterSet

from lightning_gc import centralize_gradients
from lightning_gc.plan import GCPlan, dense_plan
from lightning_gc.triton_kernel import TritonRoute

TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def gc64(grad: torch.Tensor) -> torch.Tensor:
    """The float64 reference: every output unit (dim 0) minus its mean."""
    g = grad.detach().double()
    return g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True) if g.ndim >= 2 else g


def small_net(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    ).to(device)  # fmt: skip


def batch(device: torch.device, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def check_amp_fp16_grad_scaler(device: torch.device) -> str:
    model = small_net(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(batch(device)).float().square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    expected = {n: gc64(p.grad) for n, p in model.named_parameters()}
    centralize_gradients(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[n], **TOLERANCE[torch.float32], msg=n)
    scaler.step(optimizer)
    scaler.update()
    return f"scale {scaler.get_scale():.0f}; " + check_trainer_16_mixed(device)


def check_trainer_16_mixed(device: torch.device) -> str:
    import lightning.pytorch as pl

    from lightning_gc import GradientCentralization

    class Seen(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[float] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: object) -> None:
            for p in module.parameters():
                if p.grad is not None and p.grad.ndim >= 2:
                    self.rows.append(float(p.grad.double().flatten(1).sum(1).abs().max() / p.grad.abs().max()))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_net(torch.device("cpu"))

        def training_step(self, data: list[torch.Tensor], index: int) -> torch.Tensor:
            return self.net(data[0]).float().square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(80, 3, 8, 8)), batch_size=16)
    seen = Seen()
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            accelerator="cuda", devices=1, precision="16-mixed", max_steps=5, default_root_dir=logs,
            callbacks=[GradientCentralization(), seen], enable_progress_bar=False, log_every_n_steps=1,
        )  # fmt: skip
        trainer.fit(Module(), data)
    worst = max(seen.rows)
    assert worst < 1e-3, f"a row's gradient sum after GC is {worst} of its largest entry"
    return f"Trainer 16-mixed: row sums <= {worst:.1e} of the largest entry, {len(seen.rows)} weights checked"


def check_bfloat16_eager(device: torch.device) -> str:
    model = small_net(device).to(torch.bfloat16)
    model(batch(device, dtype=torch.bfloat16)).float().square().mean().backward()
    expected = {n: gc64(p.grad) for n, p in model.named_parameters()}
    centralize_gradients(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[n], **TOLERANCE[torch.bfloat16], msg=n)
    return "eager routes, bfloat16 gradients"


def offset_grads(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for shape in shapes:
        value = torch.randn(shape, generator=generator, dtype=torch.float64)
        value = value + 3 * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=generator, dtype=torch.float64)
        out.append(value.to(device=device, dtype=dtype))
    return out


def triton_route_for(model: nn.Module, devices: tuple[str, ...]) -> tuple[GCPlan, TritonRoute]:
    plan = dense_plan(model)
    return plan, TritonRoute(plan._executor.units, devices)


def check_triton_kernel(device: torch.device) -> str:
    shapes = [(7, 5), (16, 16), (33, 1000), (5, 3000), (64, 3, 3, 3), (128, 9216)]
    lines = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        model = nn.Sequential(*[nn.Linear(s[1], s[0]) if len(s) == 2 else nn.Conv2d(s[1], s[0], s[2]) for s in shapes])
        model = model.to(device=device, dtype=dtype)
        _, route = triton_route_for(model, (device.type,))
        grads = offset_grads(shapes, dtype, device)
        if dtype == torch.bfloat16:  # the documented behaviour: float32 means, one rounding to nearest even
            expected = [
                (g.float() - g.float().mean(dim=tuple(range(1, g.ndim)), keepdim=True)).to(dtype) for g in grads
            ]
        else:
            expected = [gc64(g) for g in grads]
        removed: list[torch.Tensor] = []
        assert route.run(grads, 1.0, removed) == []
        for g, want in zip(grads, expected):
            if dtype == torch.bfloat16:  # the means' float32 summation order may move a value by one unit
                ulps = (g.view(torch.int16).int() - want.view(torch.int16).int()).abs().max()
                assert int(ulps) <= 1, f"bfloat16 differs by {int(ulps)} units in the last place"
            else:
                torch.testing.assert_close(g.double(), want, **TOLERANCE[dtype])
        launches = (
            kernel_launches(lambda route=route, grads=grads: route.run(grads, 1.0, None))
            if device.type == "cuda"
            else route.launches
        )
        lines.append(f"{str(dtype).removeprefix('torch.')}: {launches} launch(es) for {len(shapes)} tensors")
    return "; ".join(lines)


def check_cuda_graph(device: torch.device) -> str:
    return "; ".join(captured_step_matches(device, use_triton) for use_triton in (False, True))


def captured_step_matches(device: torch.device, use_triton: bool) -> str:
    """Capture zero_grad(set_to_none=False) + forward + backward + GC in a CUDA graph; replay on new inputs."""
    model = small_net(device)
    reference = small_net(torch.device("cpu")).double()
    static_x = batch(device)
    plan, route = triton_route_for(model, ("cuda",))
    units = plan._executor.units

    def step() -> None:
        for p in model.parameters():
            p.grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad.zero_()  # zero_grad(set_to_none=False): the same buffers every step
        model(static_x).square().mean().backward()
        if use_triton:
            assert route.run([u.param.grad for u in units], 1.0, None) == []
        else:
            centralize_gradients(model)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside capture, as CUDA graphs require
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2):
        new_x = batch(device, seed)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        reference.zero_grad(set_to_none=True)
        reference(new_x.cpu().double()).square().mean().backward()
        for (n, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad.double().cpu(), gc64(r.grad), rtol=1e-4, atol=1e-5, msg=n)
    return ("Triton" if use_triton else "eager") + " route captured and replayed twice"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def distributed_worker(rank: int, world: int, port: int, mode: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    try:
        model = small_net(device)
        reference = small_net(torch.device("cpu")).double()
        batches = [batch(torch.device("cpu"), seed) for seed in range(world)]
        if mode == "ddp":
            wrapped: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer)
            wrapped = fully_shard(model)
        wrapped(batches[rank].to(device)).square().mean().backward()
        centralize_gradients(model)
        for x in batches:  # DDP and FSDP2 average over ranks: the reference averages the per-batch gradients
            (reference(x.double()).square().mean() / world).backward()
        for (n, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(grad.double().cpu(), gc64(r.grad), rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {n}")
    finally:
        dist.destroy_process_group()


def check_distributed(mode: str) -> Callable[[torch.device], str]:
    def check(device: torch.device) -> str:
        import torch.multiprocessing as mp

        world = min(2, torch.cuda.device_count())
        mp.spawn(distributed_worker, args=(world, free_port(), mode), nprocs=world, join=True)  # raises a rank's error
        return f"{mode.upper()} over NCCL, {world} process(es), every rank equal to the float64 reference"

    return check


def triton_table(rounds: int) -> str:
    device = torch.device("cuda")
    lines = [
        "| set | dtype | Triton / d2d copy | eager / d2d copy | launches (Triton / eager) |",
        "|---|---|---|---|---|",
    ]
    for name in ("resnet50", "gpt2-small", "many-small"):
        for dtype in (torch.float32, torch.bfloat16):
            model = ParameterSet(PARAM_SETS[name](), dtype, device)
            grads = model.centralized_grads()
            plan = dense_plan(model)
            route = TritonRoute(plan._executor.units, ("cuda",))
            all_grads = [u.param.grad for u in plan._executor.units]
            copies = [torch.empty_like(g) for g in grads]
            variants = {
                "d2d_copy": lambda c=copies, g=grads: torch._foreach_copy_(c, g),
                "triton": lambda r=route, g=all_grads: r.run(g, 1.0, None),
                "eager": plan.apply,
            }
            times = interleaved_medians(variants, Clock(device), rounds)
            launches = (kernel_launches(variants["triton"]), kernel_launches(variants["eager"]))
            lines.append(
                f"| {name} | {str(dtype).removeprefix('torch.')} | {paired_ratio(times, 'triton', 'd2d_copy'):.2f}x"
                f" | {paired_ratio(times, 'eager', 'd2d_copy'):.2f}x | {launches[0]} / {launches[1]} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="timing rounds of the benchmark tables")
    parser.add_argument("--skip-bench", action="store_true", help="checks only, no tables")
    parser.add_argument(
        "--interpreted", action="store_true",
        help="without a GPU: run the Triton check on CPU tensors under TRITON_INTERPRET=1 (checks this script)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.interpreted:
        os.environ["TRITON_INTERPRET"] = "1"
        print("triton_kernel (interpreted, CPU):", check_triton_kernel(torch.device("cpu")))
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch " + torch.__version__ + "): nothing was checked. Run it on a"
            " machine with a GPU and a CUDA build of torch (make setup TORCH=...)."
        )
        return 2
    device = torch.device("cuda")
    print(f"gpu_check on {torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}, torch {torch.__version__}")
    checks: dict[str, Callable[[torch.device], str]] = {
        "amp_fp16_grad_scaler": check_amp_fp16_grad_scaler,
        "bfloat16_eager": check_bfloat16_eager,
        "triton_kernel": check_triton_kernel,
        "cuda_graph_static_grads": check_cuda_graph,
        "ddp_nccl": check_distributed("ddp"),
        "fsdp2_nccl": check_distributed("fsdp2"),
    }
    failed = []
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            detail = check(device)
            print(f"PASS {name} ({time.perf_counter() - started:.1f} s): {detail}", flush=True)
        except Exception:
            failed.append(name)
            print(f"FAIL {name} ({time.perf_counter() - started:.1f} s):\n{traceback.format_exc()}", flush=True)
    if not args.skip_bench:
        import bench_gc

        with tempfile.TemporaryDirectory() as tmp:
            bench_gc.main(["--device", "cuda", "--rounds", str(args.rounds), "--training-steps", "0",
                           "--out", str(Path(tmp) / "bench.json")])  # fmt: skip
        print("\nTriton route (opt-in), same gradients:\n" + triton_table(args.rounds))
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
