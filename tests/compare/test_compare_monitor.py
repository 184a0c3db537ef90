"""The callback injected into every run: stops on a non-finite loss, reports progress, tags the hparams."""

import json

import lightning.pytorch as pl
import pytest
import torch
import yaml
from clean_exit import CleanDistributedExit
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_gc.compare import RunMonitor


class Regression(pl.LightningModule):
    def __init__(self, lr: float = 0.01, nan_from_step: int = -1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if 0 <= self.hparams.nan_from_step <= self.global_step:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _fit(tmp_path, model, max_epochs=3):
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    monitor = RunMonitor(status_file=str(tmp_path / "status.json"), arm="gc", seed=7, interval=0)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        logger=TensorBoardLogger(tmp_path, name="", version="seed_7"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))  # 4 steps per epoch
    return trainer, json.loads((tmp_path / "status.json").read_text())


def test_a_non_finite_loss_stops_the_run_after_that_batch(tmp_path):
    trainer, status = _fit(tmp_path, Regression(nan_from_step=5))
    assert trainer.global_step == 6  # steps 0..5 ran, of 12
    assert status["state"] == "diverged" and status["diverged_at_step"] == 5
    accumulator = EventAccumulator(str(tmp_path / "seed_7"))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(6))  # the NaN point is logged at the step it reports
    assert losses[-1].value != losses[-1].value


def test_a_finite_run_reports_progress_and_tags_its_hparams(tmp_path):
    trainer, status = _fit(tmp_path, Regression(lr=0.02), max_epochs=2)
    assert trainer.global_step == 8
    assert status == {
        "state": "fit_done",
        "epoch": 2,
        "max_epochs": 2,
        "step": 8,
        "total_steps": 8,
        "diverged_at_step": None,
        "val_class_counts": None,  # no validation
    }
    hparams = yaml.safe_load((tmp_path / "seed_7" / "hparams.yaml").read_text())
    assert (hparams["compare/arm"], hparams["compare/seed"], hparams["lr"]) == ("gc", 7, pytest.approx(0.02))
    accumulator = EventAccumulator(str(tmp_path / "seed_7"))
    accumulator.Reload()
    # TensorBoard keeps a run's first HPARAMS session only: the comparison writes it at the end, with the status
    assert not any(tag.startswith("_hparams_") for tag in accumulator.Tags()["tensors"])
    assert "hp_metric" not in accumulator.Tags()["scalars"]  # no made-up metric values


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_validation_labels_of_one_full_pass_are_counted(tmp_path):
    labels = torch.tensor([0, 2, 2, 1, 2, 0, 2, 2, 1, 0])  # 3 x class 0, 2 x class 1, 5 x class 2
    val = DataLoader(TensorDataset(torch.randn(10, 4), labels), batch_size=3)  # 4 batches, the last one short
    train = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        callbacks=[RunMonitor(status_file=str(tmp_path / "status.json"), interval=0)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,  # the sanity pass sees 2 batches: it must not be counted
    )
    trainer.fit(Classifier(), train, val)
    assert json.loads((tmp_path / "status.json").read_text())["val_class_counts"] == [3, 2, 5]


def test_labels_are_only_integer_class_vectors():
    from lightning_gc.compare.monitor import class_labels

    assert class_labels((torch.zeros(2, 1), torch.tensor([0.5, 1.0]))) is None  # regression targets
    assert class_labels((torch.zeros(2, 1), torch.tensor([[0, 1], [1, 0]]))) is None  # multi-label
    assert class_labels({"x": torch.zeros(2), "label": torch.tensor([3, 1])}).tolist() == [3, 1]
    assert class_labels(torch.zeros(2)) is None


def test_interval_must_not_be_negative():
    with pytest.raises(ValueError, match="`interval` must be a number of seconds >= 0, got -1"):
        RunMonitor(interval=-1)


class RankOneDiverges(Regression):
    """Only rank 1's loss turns NaN: both ranks must still stop after the same batch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_rank == 1 and self.global_step >= 3 else loss


@pytest.mark.slow
def test_every_rank_stops_at_the_batch_where_one_rank_diverged(tmp_path):
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=TensorBoardLogger(tmp_path, name="", version="seed_0"),
        callbacks=[RunMonitor(status_file=str(tmp_path / "status.json"), interval=0), CleanDistributedExit()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(RankOneDiverges(), DataLoader(data, batch_size=4))  # 4 steps per rank and epoch
    status = json.loads((tmp_path / "status.json").read_text())  # written by rank 0, whose loss stayed finite
    assert status["state"] == "diverged" and status["diverged_at_step"] == 3 and status["step"] == 4
