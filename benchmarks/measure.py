"""How the benchmark measures: interleaved timing with medians, allocator-level peak memory, kernel launches."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

Variant = Callable[[], object]


class Clock:
    """Times one call of a variant.

    On CPU with one intra-op thread it reads the calling thread's CPU time, which is what the call costs even
    when other processes preempt it on a shared machine; otherwise wall time (after a device sync on CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_time = device.type == "cpu" and torch.get_num_threads() == 1
        self.name = "thread CPU time" if self.cpu_time else "wall time"

    def __call__(self, fn: Variant) -> tuple[float, float]:
        """``(seconds by this clock, wall seconds)`` for one call of ``fn``."""
        self._sync()
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        self._sync()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        return (cpu if self.cpu_time else wall), wall

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def interleaved_medians(variants: dict[str, Variant], clock: Clock, rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds per variant, running every variant once per round in a rotating order.

    Rotating the order spreads slow phases of a noisy machine over all variants instead of one.
    """
    names = list(variants)
    for name in names:  # warm-up: plans, allocator, caches
        variants[name]()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(clock(variants[name]))
    return {
        name: {
            "median_s": statistics.median(s for s, _ in runs),
            "wall_median_s": statistics.median(w for _, w in runs),
            "min_s": min(s for s, _ in runs),
            "samples_s": [s for s, _ in runs],
        }
        for name, runs in samples.items()
    }


def paired_ratio(times: dict[str, dict], numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator / denominator`` timed in the same round.

    The machine's speed drifts between rounds (other processes, memory bandwidth shared with them); both
    variants of a round saw nearly the same machine, so the ratio of a round is steadier than the ratio of
    two medians taken over different rounds.
    """
    pairs = zip(times[numerator]["samples_s"], times[denominator]["samples_s"])
    return statistics.median(a / b for a, b in pairs if b > 0)


def peak_extra_bytes(fn: Variant, device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started.

    CPU: replays the allocator's own allocation and free records (torch profiler, ``profile_memory``) in time
    order, so temporaries freed inside an operator count too. CUDA: ``max_memory_allocated``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


def kernel_launches(fn: Variant) -> int:
    """CUDA kernels (and memcpy/memset operations) launched by one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
