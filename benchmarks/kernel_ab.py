"""Two builds of the fused kernel against the floor, in one process: is a change to ``kernel.c`` faster?

``python benchmarks/kernel_ab.py OLD.c [NEW.c]`` compiles each source with the flags lightning_gc uses
(``-O3 -march=native -fopenmp``) and times each library's ``lgc_centralize`` straight through ctypes (no
plan, no Python per tensor) on the same gradients, interleaved with the floor (``torch._foreach_mul_(grads,
1.0)``): medians over rounds of the ratio within a round, as ``bench_gc.py`` does. NEW defaults to the
shipped ``lightning_gc/native/kernel.c``. ``git show HEAD~1:lightning_gc/native/kernel.c > /tmp/old.c`` gives
an older one. Results are only a comparison of kernels: the plan's Python work per call is not in them.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import Clock, interleaved_medians, paired_ratio
from param_sets import PARAM_SETS, ParameterSet

from lightning_gc.native import build
from lightning_gc.native.route import DTYPE_CODES, MIN_ENTRIES_PER_THREAD, row_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def compiled(source: Path, folder: Path, name: str) -> build.Kernel:
    command = build.compiler()
    if command is None:
        raise SystemExit("no C compiler found")
    out = folder / f"{name}.so"
    subprocess.run([*command, *build.FLAGS, *build.OPTIONAL_FLAGS[0], "-o", str(out), str(source)], check=True)
    return build.Kernel(ctypes.CDLL(str(out)), out)


def caller(kernel: build.Kernel, grads: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    n = len(grads)
    layouts = [row_layout(g.shape, g.stride(), 0) for g in grads]
    assert all(layouts), "every gradient of the parameter sets is a row layout"
    int64s = ctypes.c_int64 * n
    args = (
        n, int64s(*[g.data_ptr() for g in grads]), int64s(*[0] * n),
        int64s(*[lay[0] for lay in layouts]), int64s(*[lay[1] for lay in layouts]),  # type: ignore[index]
        int64s(*[lay[2] for lay in layouts]), (ctypes.c_int32 * n)(*[DTYPE_CODES[g.dtype] for g in grads]),  # type: ignore[index]
        (ctypes.c_double * n)(*[0.0] * n),
    )  # fmt: skip
    return lambda: kernel.centralize(*args, torch.get_num_threads(), MIN_ENTRIES_PER_THREAD, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=build.SOURCE)
    parser.add_argument("--sets", default="resnet50,gpt2-small,many-small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = Clock(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        old, new = compiled(args.old, Path(tmp), "old"), compiled(args.new, Path(tmp), "new")
        print(f"| set | dtype | old / floor | new / floor | new / old |   ({clock.name}, {args.rounds} rounds)")
        print("|---|---|---|---|---|")
        for name in args.sets.split(","):
            for dtype_name in args.dtypes.split(","):
                model = ParameterSet(PARAM_SETS[name](), DTYPES[dtype_name], torch.device("cpu"))
                grads = model.centralized_grads()
                variants = {
                    "floor": lambda grads=grads: torch._foreach_mul_(grads, 1.0),
                    "old": caller(old, grads),
                    "new": caller(new, grads),
                }
                times = interleaved_medians(variants, clock, args.rounds)
                ratios = [paired_ratio(times, a, b) for a, b in (("old", "floor"), ("new", "floor"), ("new", "old"))]
                print(f"| {name} | {dtype_name} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
