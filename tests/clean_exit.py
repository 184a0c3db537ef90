"""Leave a gloo process group cleanly before a worker process exits.

Destroying the group only in an ``atexit`` handler (Lightning's default) races with gloo's threads at
interpreter exit and now and then aborts a finished worker ("terminate called without an active exception").
All ranks meet at a barrier, then destroy the group while the interpreter is still fully alive.
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch import Callback


def leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class CleanDistributedExit(Callback):
    """Runs :func:`leave_process_group` in ``teardown``, the Trainer's last step on every rank."""

    def teardown(self, trainer, pl_module, stage: str) -> None:
        leave_process_group()
