"""A few spawned ranks sharing one gloo process group, reused by many tests.

Starting processes and importing torch and Lightning costs seconds per rank; the ranks here stay up for a
whole test module and run one function at a time, by reference, on every rank. A failure on one rank may
leave the others blocked in a collective: ``run`` then times out, the pool is torn down (only its own
processes) and the next test gets a fresh one.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """A function raised on some rank; the message holds that rank's traceback."""


class DistPool:
    """``world_size`` ranks on CPU with an initialized gloo default process group.

    Each rank sees the environment Lightning expects from an external launcher (``LOCAL_RANK`` etc.), so a
    ``Trainer`` created inside :meth:`run` joins the existing process group instead of launching processes.
    """

    def __init__(self, world_size: int, timeout: float = 120.0) -> None:
        self.world_size = world_size
        self.timeout = timeout
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self._procs = [
            ctx.Process(target=_serve, args=(rank, world_size, port, self._tasks[rank], self._results), daemon=True)
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(*args)`` on every rank; the return values ordered by rank."""
        for tasks in self._tasks:
            tasks.put((fn, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self._results.get(timeout=self.timeout)
                outcomes[rank] = (ok, value)
                if not ok:  # the other ranks may be stuck in a collective: give them a moment, then give up
                    self._drain(outcomes, patience=10.0)
                    break
        except queue.Empty as err:
            self.broken = True
            missing = sorted(set(range(self.world_size)) - set(outcomes))
            raise TimeoutError(f"{fn.__name__} did not finish on ranks {missing}") from err
        failures = {r: v for r, (ok, v) in outcomes.items() if not ok}
        if failures or len(outcomes) < self.world_size:
            self.broken = True
            raise RankFailure("\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(failures.items())))
        return [outcomes[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks: politely if they are idle, by their pids otherwise."""
        if not self.broken:
            for tasks in self._tasks:
                tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=10 if not self.broken else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)

    def _drain(self, outcomes: dict[int, tuple[bool, Any]], patience: float) -> None:
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self._results.get(timeout=patience)
                outcomes[rank] = (ok, value)
        except queue.Empty:
            pass


class LazyPool:
    """A :class:`DistPool` started on first use and restarted after a failure left it unusable."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._pool: DistPool | None = None

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        if self._pool is None or self._pool.broken:
            self.close()
            self._pool = DistPool(self.world_size)
        return self._pool.run(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _serve(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        while (task := tasks.get()) is not None:
            fn, args = task
            try:
                results.put((rank, True, fn(*args)))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
        results.close()
        results.join_thread()  # everything this rank reported has reached the pipe
    # Interpreter shutdown with torch and Lightning loaded takes seconds and does nothing this rank needs.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
