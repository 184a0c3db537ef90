"""GC reaches the recurrent and linear weights, not the embedding table (unless the config says so)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning_gc import GradientCentralization

from {{ cookiecutter.package_name }}.data import SentimentDataModule
from {{ cookiecutter.package_name }}.model import SentimentRNN

RECURRENT_AND_LINEAR = {
    "net.rnn.weight_ih_l0",
    "net.rnn.weight_hh_l0",
    "net.rnn.weight_ih_l0_reverse",
    "net.rnn.weight_hh_l0_reverse",
    "net.classifier.weight",
}


class GradientProbe(pl.Callback):
    """Copies every gradient, in float64, when its ``on_before_optimizer_step`` runs."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.detach().double().clone() for n, p in pl_module.named_parameters() if p.grad is not None
            }


@pytest.fixture(scope="module")
def datamodule() -> SentimentDataModule:
    return SentimentDataModule(batch_size=16)


def one_step(
    gc: GradientCentralization, cell: str, datamodule: SentimentDataModule
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The gradients of the first step before and after ``gc`` (callbacks run in list order)."""
    pl.seed_everything(0)
    before, after = GradientProbe(), GradientProbe()
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        callbacks=[before, gc, after],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = SentimentRNN(cell=cell, embedding_dim=16, hidden_size=8, dropout=0.0)
    trainer.fit(model, datamodule=datamodule)
    return before.grads, after.grads


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_default_centralizes_recurrent_and_linear_weights_only(cell: str, datamodule) -> None:
    before, after = one_step(GradientCentralization(), cell, datamodule)
    for name, grad in before.items():
        if name in RECURRENT_AND_LINEAR:
            expected = grad - grad.mean(dim=1, keepdim=True)  # the paper: mean over all dims but the output dim
            torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-7)
            assert grad.sub(expected).abs().max() > 0, f"{name}: the test would not see GC"
        else:  # the embedding table and every bias
            assert torch.equal(after[name], grad), name


def test_commented_config_line_brings_the_embedding_in(in_project, datamodule) -> None:
    text = (in_project / "configs" / "gc.yaml").read_text()
    assert "#   exclude_modules: []" in text
    enabled = text.replace("        exclude_modules: [Embedding, EmbeddingBag]\n", "").replace(
        "#   exclude_modules: []", "exclude_modules: []"
    )
    init_args = yaml.safe_load(enabled)["trainer"]["callbacks"][-1]["init_args"]
    assert init_args["exclude_modules"] == []
    before, after = one_step(GradientCentralization(**init_args), "lstm", datamodule)
    grad = before["net.embedding.weight"]
    torch.testing.assert_close(
        after["net.embedding.weight"], grad - grad.mean(dim=1, keepdim=True), rtol=1e-5, atol=1e-7
    )
