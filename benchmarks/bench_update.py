"""The extra time and memory of GC of the update (``apply_to="update"``) per optimizer step.

The update placement adds, per step, one read of the selected weights before the step (unit sums) and one
read+write after it (sum each block of units, subtract the change of their means). This script times, in
one process, interleaved (medians over rounds of the ratio within a round, as ``bench_gc.py`` does):

- ``update GC``: the pre-hook and the post-hook work (``UpdatePlan.record`` + ``UpdatePlan.correct``);
- ``step``: a plain ``torch.optim.Adam`` step (foreach, the CPU default) over the same parameters;
- ``copy``: a weight-sized copy (``torch._foreach_copy_``), what a copy-based ``w_before`` would cost per step
  (plus its memory: 100% of the weight bytes);

and reports ``update GC / step``, ``update GC / copy``, and the memory the plan holds (one sum per unit and
a bounded scratch) plus its peak temporaries, as a fraction of the weight bytes. No wall-clock asserts:
ratios only, for the machine at hand. ``python benchmarks/bench_update.py --help``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import Clock, interleaved_medians, paired_ratio, peak_extra_bytes
from param_sets import PARAM_SETS, ParameterSet, count_parameters, tiny_shapes

from lightning_gc.config import GCConfig
from lightning_gc.update import UpdatePlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def bench(name: str, shapes: list, dtype: torch.dtype, device: torch.device, rounds: int) -> dict[str, Any]:
    params = ParameterSet(shapes, dtype, device)
    with torch.no_grad():
        for p in params.parameters():
            p.normal_()
    optimizer = torch.optim.Adam(params.parameters(), lr=1e-3)
    optimizer.step()  # Adam's state exists before timing
    plan = UpdatePlan.for_optimizer(optimizer, params, GCConfig(), warn=lambda message: None)
    weights = [w for w in (p.detach() for p in params.parameters()) if w.ndim >= 2]
    copies = [torch.empty_like(w) for w in weights]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)

    def update_gc() -> None:
        plan.record()
        plan.correct()

    variants = {
        "update_gc": update_gc,
        "step": optimizer.step,
        "copy": lambda: torch._foreach_copy_(copies, weights),
    }
    times = interleaved_medians(variants, Clock(device), rounds)
    return {
        "set": name,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(weights),
        "parameters": count_parameters(shapes),
        "weight_mb": weight_bytes / 2**20,
        "update_gc_ms": 1e3 * times["update_gc"]["median_s"],
        "step_ms": 1e3 * times["step"]["median_s"],
        "copy_ms": 1e3 * times["copy"]["median_s"],
        "over_step": paired_ratio(times, "update_gc", "step"),
        "over_copy": paired_ratio(times, "update_gc", "copy"),
        "held_fraction": plan.extra_bytes / weight_bytes,
        "peak_temporary_fraction": peak_extra_bytes(update_gc, device) / weight_bytes,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| parameter set | dtype | weights | update GC | Adam step | copy | update GC / step | update GC / copy"
        " | memory held | peak temporaries |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} ({r['tensors']} weights) | {r['dtype']} | {r['weight_mb']:.1f} MiB | {r['update_gc_ms']:.2f} ms"
            f" | {r['step_ms']:.2f} ms | {r['copy_ms']:.2f} ms | {r['over_step']:.2f}x | {r['over_copy']:.2f}x"
            f" | {100 * r['held_fraction']:.2f}% | {100 * r['peak_temporary_fraction']:.3f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="resnet50,many-small", help=f"comma-separated, of {sorted(PARAM_SETS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per variant (default 15)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: thread CPU time)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a few tiny tensors, 3 rounds (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sets = {"tiny": tiny_shapes} if args.quick else {n: PARAM_SETS[n] for n in args.sets.split(",")}
    rounds = 3 if args.quick else args.rounds
    rows = [
        bench(name, shapes(), DTYPES[dtype], device, rounds)
        for name, shapes in sets.items()
        for dtype in args.dtypes.split(",")
    ]
    clock = Clock(device).name
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s),"
        f" {device}, {clock}, medians of {rounds} interleaved rounds"
    )
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
