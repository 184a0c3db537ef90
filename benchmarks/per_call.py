"""The per-call cost that grows with the number of tensors, apart from the arithmetic.

2,000 linear weights, of shape (4, 4) (the arithmetic is negligible: what is left is the per-tensor work of
a call, the checks every gradient gets before the kernel touches it) and (64, 64) (the many-small set of
``bench_gc.py``). For each it times, interleaved in one process (``measure.interleaved_medians``, thread CPU
time with one thread): ``centralize_gradients(model, optimizer=...)`` (plan lookup included), the cached
plan's ``apply()``, and the floor ``torch._foreach_mul_(grads, 1.0)``; it prints milliseconds per call, the
microseconds per tensor of ``apply()`` and the ratios to the floor::

    python benchmarks/per_call.py [--rounds 101] [--tensors 2000]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from measure import Clock, interleaved_medians, paired_ratio
from torch import nn

from lightning_gc import centralize_gradients, native
from lightning_gc.functional import plan_for


def per_call(shape: tuple[int, int], tensors: int, rounds: int) -> dict[str, float]:
    """Median ms per call of each variant for ``tensors`` linear weights of ``shape``, and the ratios."""
    model = nn.ModuleList(nn.Linear(shape[1], shape[0], bias=False) for _ in range(tensors))
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = [param.grad for param in model.parameters()]
    plan = plan_for(model, optimizer)
    variants = {
        "centralize_gradients": lambda: centralize_gradients(model, optimizer=optimizer),
        "plan.apply": plan.apply,
        "floor": lambda: torch._foreach_mul_(grads, 1.0),
    }
    times = interleaved_medians(variants, Clock(torch.device("cpu")), rounds)
    result = {f"{name} ms": 1e3 * t["median_s"] for name, t in times.items()}
    result["plan.apply us per tensor"] = 1e6 * times["plan.apply"]["median_s"] / tensors
    result["centralize_gradients / floor"] = paired_ratio(times, "centralize_gradients", "floor")
    result["plan.apply / floor"] = paired_ratio(times, "plan.apply", "floor")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--tensors", type=int, default=2000)
    args = parser.parse_args()
    if args.rounds < 1 or args.tensors < 1:
        parser.error(f"--rounds and --tensors must be >= 1, got {args.rounds} and {args.tensors}")
    torch.set_num_threads(1)
    print(
        f"kernel: {native.status().reason}; {args.tensors} tensors, {args.rounds} interleaved rounds, thread CPU time"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bare weights have no registered layer: "assumed dim 0" is expected
        for shape in ((4, 4), (64, 64)):
            figures = per_call(shape, args.tensors, args.rounds)
            print(shape, ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
