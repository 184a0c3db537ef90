"""Train, test and use the sentiment model: ``python train.py {fit,validate,test,predict} --config ...``."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from {{ cookiecutter.package_name }}.data import SentimentDataModule
from {{ cookiecutter.package_name }}.model import SentimentRNN
from {{ cookiecutter.package_name }}.predictions import PrintPredictions

# The same filters in every template (pyproject.toml's pytest ones too): Lightning's notes about its own use of
# its dependencies, not this project's.
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", ".*The .srun. command is available on your system.*")


class SentimentCLI(LightningCLI):
    """LightningCLI whose ``predict`` prints one ``label<TAB>probability<TAB>review`` line per review.

    ``predict`` writes nothing into the runs (no logger, no saved config) and, unless
    ``--trainer.enable_progress_bar true`` is given, draws no progress bar: its output is the predictions only.
    """

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.subcommand == "predict":
            kwargs["logger"] = False
            if self._get(self.config_init, "trainer", default={}).get("enable_progress_bar") is None:
                kwargs["enable_progress_bar"] = False
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "predict":
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
            trainer.callbacks.append(PrintPredictions())
            # The weights and the text encoder are all predict needs; the training callbacks' states are not.
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
        return trainer


def main(args: Optional[list[str]] = None) -> LightningCLI:
    """Run the command line; after ``fit`` (unless ``fast_dev_run``), test the best checkpoint."""
    cli = SentimentCLI(SentimentRNN, SentimentDataModule, args=args, save_config_kwargs={"overwrite": True})
    if cli.subcommand == "fit" and not cli.trainer.fast_dev_run:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    return cli


if __name__ == "__main__":
    main()
