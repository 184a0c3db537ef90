"""Train, validate and test an anomaly detector: ``python train.py fit --config configs/gc.yaml``.

After ``fit`` the best checkpoint (by ``val/auroc``), with the threshold chosen on validation at that epoch,
is tested, unless the run was a ``fast_dev_run``.
"""

from __future__ import annotations

import os
import warnings

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from {{ cookiecutter.package_name }} import AnomalyDetector, RadiologyDataModule

# The images are tensors in memory: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# The same filters in every template (pyproject.toml's pytest ones too): Lightning's notes about its own use of
# its dependencies, not this project's.
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", ".*The .srun. command is available on your system.*")


def trains_on_normal_only(variant: str) -> bool:
    """The autoencoder learns what normal looks like, so it must never see an anomalous training image."""
    return variant == "autoencoder"


class AnomalyCLI(LightningCLI):
    """LightningCLI that derives ``data.train_normal_only`` from ``model.variant`` and tells the model the image size."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.variant", "data.train_normal_only", compute_fn=trains_on_normal_only)
        parser.link_arguments("data.image_size", "model.image_size")


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the command line (``args`` instead of ``sys.argv`` when given); returns the finished CLI."""
    if "OMP_NUM_THREADS" not in os.environ:
        # These networks are small: intra-op threads gain little and spin-wait badly on busy cores (measured
        # on a loaded 2-core machine: the classifier's 12 epochs took 192 CPU-s with 2 threads, 45 with 1).
        # Set OMP_NUM_THREADS to choose another number.
        torch.set_num_threads(1)
    cli = AnomalyCLI(AnomalyDetector, RadiologyDataModule, args=args, save_config_kwargs={"overwrite": True})
    if cli.subcommand == "fit" and not cli.trainer.fast_dev_run:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    return cli


if __name__ == "__main__":
    main()
