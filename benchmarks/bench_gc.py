"""Benchmark Gradient Centralization against the memory-bandwidth floor and the official per-tensor loop.

Run ``make bench`` (or ``python benchmarks/bench_gc.py --help``). For parameter sets shaped like ResNet-50,
GPT-2 small and 2,000 tensors of 64x64, in float32 and bfloat16, it reports the time of
``lightning_gc.centralize_gradients`` as a ratio to

- the floor, one read+write pass over the same gradients: ``torch._foreach_mul_(grads, 1.0)``;
- the official per-tensor loop of the paper's code: ``g.add_(-g.mean(dim=dims, keepdim=True))``;

all timed in this process, interleaved, medians. On CPU, ``ours`` is the fused kernel of
``lightning_gc.native`` when it is available (the header says so); the eager routes that run without it
are timed beside it. It also reports the peak extra memory GC allocates as a
fraction of the gradient bytes, and the callback's share of the training step on every shipped template
(rendered, trained with its own ``configs/gc.yaml``, diagnostics on; ``template_share.py``).
On CUDA it also counts kernel launches per call and compares with a device-to-device copy of the gradients.
Results: a table on stdout and JSON (default ``benchmarks/results/bench_gc.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import Clock, interleaved_medians, kernel_launches, paired_ratio, peak_extra_bytes
from param_sets import PARAM_SETS, ParameterSet, count_parameters, tiny_shapes

from lightning_gc import centralize_gradients, native
from lightning_gc.config import GCConfig
from lightning_gc.plan import GCPlan, dense_plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_gc.json"


def official_loop(grads: list[torch.Tensor]) -> None:
    """The per-tensor loop of the paper's code (Yong et al., ``centralized_gradient``)."""
    for g in grads:
        g.add_(-g.mean(dim=tuple(range(1, g.ndim)), keepdim=True))


def reference_variants(grads: list[torch.Tensor], device: torch.device) -> dict[str, Any]:
    """What GC is timed against: the floor, the official loop and, on CUDA, a device-to-device copy."""
    variants = {"floor": lambda: torch._foreach_mul_(grads, 1.0), "official": lambda: official_loop(grads)}
    if device.type == "cuda":
        copies = [torch.empty_like(g) for g in grads]
        variants["d2d_copy"] = lambda: torch._foreach_copy_(copies, grads)
    return variants


def bench_param_set(name: str, shapes: list, dtype: torch.dtype, device: torch.device, rounds: int) -> dict[str, Any]:
    model = ParameterSet(shapes, dtype, device)
    grads = model.centralized_grads()
    variants = {**reference_variants(grads, device), "lightning_gc": lambda: centralize_gradients(model)}
    if device.type == "cpu" and native.status().available:
        variants["eager"] = eager_plan(model).apply
    clock = Clock(device)
    times = interleaved_medians(variants, clock, rounds)
    grad_bytes = model.grad_bytes()
    row: dict[str, Any] = {
        "set": name,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(shapes),
        "centralized_tensors": len(grads),
        "parameters": count_parameters(shapes),
        "grad_mib": grad_bytes / 2**20,
        "clock": clock.name,
        "times": times,
        "ours_over_floor": paired_ratio(times, "lightning_gc", "floor"),
        "official_over_floor": paired_ratio(times, "official", "floor"),
        "ours_over_official": paired_ratio(times, "lightning_gc", "official"),
        "wall_ours_over_floor": times["lightning_gc"]["wall_median_s"] / times["floor"]["wall_median_s"],
        "peak_extra_fraction": peak_extra_bytes(lambda: centralize_gradients(model), device) / grad_bytes,
        "official_peak_extra_fraction": peak_extra_bytes(lambda: official_loop(grads), device) / grad_bytes,
    }
    if "eager" in times:
        row["eager_over_floor"] = paired_ratio(times, "eager", "floor")
    if device.type == "cuda":
        row["ours_over_d2d_copy"] = paired_ratio(times, "lightning_gc", "d2d_copy")
        row["kernel_launches"] = kernel_launches(lambda: centralize_gradients(model))
        row["official_kernel_launches"] = kernel_launches(lambda: official_loop(grads))
    return row


def bench_compiled(row: dict[str, Any], shapes: list, dtype: torch.dtype, device: torch.device, rounds: int) -> None:
    """Add the opt-in compiled route's figures to ``row``.

    Run after every other measurement: once Inductor has compiled in a process, the other variants were seen
    to run a few percent slower.
    """
    model = ParameterSet(shapes, dtype, device)
    grads = model.centralized_grads()
    compiled = dense_plan(model, GCConfig(compile=True))
    started = time.perf_counter()
    compiled.apply()  # compiles
    compile_s = time.perf_counter() - started
    if compiled._executor.compiled.unavailable:  # the warning said why; time the eager fallback anyway
        compile_s = None
    variants = {**reference_variants(grads, device), "compiled": compiled.apply}
    times = interleaved_medians(variants, Clock(device), rounds)
    row["compile_s"] = compile_s
    row["compiled_times"] = times
    row["compiled_over_floor"] = paired_ratio(times, "compiled", "floor")
    row["compiled_over_official"] = paired_ratio(times, "compiled", "official")
    row["compiled_peak_extra_fraction"] = peak_extra_bytes(compiled.apply, device) / model.grad_bytes()
    if device.type == "cuda":
        row["compiled_over_d2d_copy"] = paired_ratio(times, "compiled", "d2d_copy")
        row["compiled_kernel_launches"] = kernel_launches(compiled.apply)


def eager_plan(model: torch.nn.Module) -> GCPlan:
    """A plan that leaves the fused kernel aside, as on a machine without a C compiler."""
    previous = os.environ.get(native.ENV_SWITCH)
    os.environ[native.ENV_SWITCH] = "0"
    try:
        return dense_plan(model)
    finally:
        if previous is None:
            del os.environ[native.ENV_SWITCH]
        else:
            os.environ[native.ENV_SWITCH] = previous


def environment(device: torch.device) -> dict[str, Any]:
    import lightning

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m_at_start": os.getloadavg()[0],
    }
    if device.type == "cpu":
        status = native.status()
        env["fused_kernel"] = str(status.library) if status.available else f"unavailable: {status.reason}"
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def format_table(result: dict[str, Any]) -> str:
    env = result["environment"]
    load = f"{env['load_average_1m_at_start']:.1f} at start, {env['load_average_1m_at_end']:.1f} at end"
    lines = [
        f"device: {env['device']} ({env['device_type']}), {env['cpu_count']} CPUs,"
        f" torch threads {env['torch_threads']}, torch {env['torch']}, lightning {env['lightning']},"
        f" python {env['python']}; 1-min load average {load}",
        f"clock: {result['rows'][0]['clock'] if result['rows'] else '-'};"
        f" ratios are medians over {result['rounds']} interleaved rounds of the ratio within a round",
    ]
    if "fused_kernel" in env:
        kernel = env["fused_kernel"]
        lines.append(
            "ours: "
            + (
                "fused CPU kernel (lightning_gc.native)"
                if not kernel.startswith("unavailable")
                else f"eager routes, the fused CPU kernel is {kernel}"
            )
        )
    lines.append("")
    eager = any("eager_over_floor" in r for r in result["rows"])
    cuda = env["device_type"] == "cuda"
    header = "| set | dtype | tensors (GC'd) | grad MiB | floor ms |"
    header += " ours / floor | official / floor | ours / official | peak extra (ours) | peak extra (official) |"
    header += " eager routes / floor |" if eager else ""
    header += " ours / d2d copy | launches (ours / official) |" if cuda else ""
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in result["rows"]:
        cells = [
            r["set"], r["dtype"], f"{r['tensors']} ({r['centralized_tensors']})", f"{r['grad_mib']:.1f}",
            f"{1e3 * r['times']['floor']['median_s']:.2f}", f"{r['ours_over_floor']:.2f}x",
            f"{r['official_over_floor']:.2f}x", f"{r['ours_over_official']:.2f}x",
            f"{100 * r['peak_extra_fraction']:.2f}%", f"{100 * r['official_peak_extra_fraction']:.1f}%",
        ]  # fmt: skip
        if eager:
            cells.append(f"{r['eager_over_floor']:.2f}x" if "eager_over_floor" in r else "-")
        if cuda:
            cells += [f"{r['ours_over_d2d_copy']:.2f}x", f"{r['kernel_launches']} / {r['official_kernel_launches']}"]
        lines.append("| " + " | ".join(cells) + " |")
    compiled = [r for r in result["rows"] if "compiled_over_floor" in r]
    if compiled:
        lines += [
            "",
            "Opt-in compiled route (`GCPlan(..., compile=True)`, Inductor), same process, timed after the rest:",
            "",
            "| set | dtype | compile s (first call) | compiled / floor | compiled / official | peak extra |"
            + (" compiled / d2d copy | launches |" if cuda else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if cuda else ""),
        ]
        for r in compiled:
            seconds = "unavailable (eager fallback)" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
            cells = [
                r["set"], r["dtype"], seconds, f"{r['compiled_over_floor']:.2f}x",
                f"{r['compiled_over_official']:.2f}x", f"{100 * r['compiled_peak_extra_fraction']:.2f}%",
            ]  # fmt: skip
            if cuda:
                cells += [f"{r['compiled_over_d2d_copy']:.2f}x", str(r["compiled_kernel_launches"])]
            lines.append("| " + " | ".join(cells) + " |")
    if result["training"]:
        lines += [
            "",
            "Callback share of the training step, shipped templates with their own configs/gc.yaml (diagnostics on):",
            "",
            "| template | steps | log every | GC hook share: wall totals | CPU-time totals | wall incl. first step"
            " | hook ms/step | step ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, t in result["training"].items():
            lines.append(
                f"| {name} | {t['steps']} | {t['log_every_n_steps']} | {100 * t['hook_share']:.2f}%"
                f" | {100 * t['hook_share_cpu_time']:.2f}% | {100 * t['hook_share_incl_first_step']:.2f}%"
                f" | {t['hook_ms_per_step']:.3f} | {t['batch_ms_per_step']:.1f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(PARAM_SETS), help=f"comma-separated, from {list(PARAM_SETS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, from {list(DTYPES)}")
    parser.add_argument("--rounds", type=int, default=31, help="interleaved timing rounds per set (default 31)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads on CPU (default 1: CPU time of one thread is robust on a shared machine;"
        " 0 keeps torch's default)",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="also time the opt-in torch.compile route, on the float32 sets other than many-small (compiling"
        " 2,000 tensors takes minutes); the first call's compile time is reported",
    )  # fmt: skip
    parser.add_argument(
        "--training-steps", type=int, default=120,
        help="steps per shipped template (rendered, its configs/gc.yaml) for the callback's share; 0 skips",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="tiny sets and few rounds: a smoke run, not a benchmark")
    args = parser.parse_args(argv)
    for value, known, flag in ((args.sets, PARAM_SETS, "--sets"), (args.dtypes, DTYPES, "--dtypes")):
        unknown = [v for v in value.split(",") if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; accepted: {list(known)}")
    if args.rounds < 1 or args.threads < 0 or args.training_steps < 0:
        parser.error("--rounds must be >= 1, --threads and --training-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no banners between the results
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    result: dict[str, Any] = {"environment": environment(device), "rounds": args.rounds, "rows": [], "training": {}}
    started = time.perf_counter()
    sets = {"tiny": tiny_shapes} if args.quick else {name: PARAM_SETS[name] for name in args.sets.split(",")}
    for name, shapes_of in sets.items():
        for dtype_name in args.dtypes.split(","):
            row = bench_param_set(name, shapes_of(), DTYPES[dtype_name], device, args.rounds)
            result["rows"].append(row)
            ratios = f"ours/floor {row['ours_over_floor']:.2f}x, ours/official {row['ours_over_official']:.2f}x"
            print(f"{name} {dtype_name}: {ratios}", flush=True)
    if args.training_steps:  # before anything is compiled, like the sets above
        from template_share import template_share

        from lightning_gc.cli.new import find_templates

        for template in ["digits-cnn"] if args.quick else sorted(find_templates()):
            result["training"][template] = template_share(template, args.training_steps)
    for row in result["rows"] if args.compile else []:
        if row["dtype"] == "float32" and row["set"] != "many-small":
            bench_compiled(row, sets[row["set"]](), torch.float32, device, args.rounds)
            print(f"{row['set']} float32 compiled: {row['compiled_over_floor']:.2f}x the floor", flush=True)
    result["environment"]["load_average_1m_at_end"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - started
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
