"""Train, validate and test the digits CNN: ``python train.py fit --config configs/gc.yaml``.

After ``fit`` the best checkpoint (by ``val/acc``) is tested, unless the run was a ``fast_dev_run``.
"""

from __future__ import annotations

import os
import warnings

import torch
from lightning.pytorch.cli import LightningCLI

from {{ cookiecutter.package_name }} import DigitsCNN, DigitsDataModule

# The digits are tensors in memory: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# The same filters in every template (pyproject.toml's pytest ones too): Lightning's notes about its own use of
# its dependencies, not this project's.
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", ".*The .srun. command is available on your system.*")


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the command line (``args`` instead of ``sys.argv`` when given); returns the finished CLI."""
    if "OMP_NUM_THREADS" not in os.environ:
        # A network this small gains little from intra-op threads, and they spin-wait badly on busy cores
        # (measured on a loaded 2-core machine: 4.6 s per epoch with 1 thread, 25.8 s with 2).
        # Set OMP_NUM_THREADS to choose another number.
        torch.set_num_threads(1)
    cli = LightningCLI(DigitsCNN, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})
    if cli.subcommand == "fit" and not cli.trainer.fast_dev_run:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    return cli


if __name__ == "__main__":
    main()
