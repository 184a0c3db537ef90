"""The LightningModule: training, metrics, and the text encoder that travels with every checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score

from .batching import Batch, collate
from .encoder import TextEncoder
from .network import CELLS, Cell, RNNClassifier

ENCODER_KEY = "text_encoder"


class SentimentRNN(pl.LightningModule):
    """Binary sentiment of movie reviews with an embedding, a (bi)LSTM or GRU, and a linear classifier.

    The network is built once the vocabulary is known: from the data module's training split (``fit``,
    ``validate``, ``test``) or from the checkpoint, which stores the text encoder (tokenizer version,
    vocabulary, truncation) next to the weights, so that ``predict`` works on raw text after reloading.

    Logs ``train/loss`` and ``train/grad_norm`` per step; ``val/loss``, ``val/acc``, ``val/f1``, ``val/auroc``
    per epoch, and the same under ``test/``.

    Args:
        cell: ``"lstm"`` or ``"gru"``.
        embedding_dim: size of a token embedding.
        hidden_size: recurrent state size per direction.
        num_layers: stacked recurrent layers.
        bidirectional: read each review both ways.
        dropout: dropout probability in ``[0, 1)``.
        lr: Adam learning rate.
        weight_decay: Adam's (coupled) L2 penalty; ``GradientCentralization(centralize_weight_decay=True)``
            centralizes ``g + weight_decay * w`` as the paper's SGD_GC/Adam_GC do.

    Raises:
        ValueError: for an invalid argument, naming it and the accepted values.

    Example:
        >>> from .vocabulary import Vocabulary
        >>> model = SentimentRNN(cell="gru", hidden_size=8, embedding_dim=8)
        >>> model.set_encoder(TextEncoder(Vocabulary(["<pad>", "<unk>", "great", "dull"])))
        >>> probabilities = model.predict_proba(["Great!", "dull, dull, dull"])
        >>> probabilities.shape, bool(((probabilities > 0) & (probabilities < 1)).all())
        (torch.Size([2]), True)
    """

    def __init__(
        self,
        cell: Cell = "lstm",
        embedding_dim: int = 128,
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.5,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"`cell` must be one of {tuple(CELLS)}, got {cell!r}")
        for name, value in (("embedding_dim", embedding_dim), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if not isinstance(bidirectional, bool):
            raise ValueError(f"`bidirectional` must be True or False, got {bidirectional!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"`lr` must be a number > 0, got {lr!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a number >= 0, got {weight_decay!r}")
        self.save_hyperparameters()
        self.encoder: Optional[TextEncoder] = None
        self.net: Optional[RNNClassifier] = None
        metrics = MetricCollection({"acc": BinaryAccuracy(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def set_encoder(self, encoder: TextEncoder) -> None:
        """Adopt ``encoder`` and build the network for its vocabulary (once).

        Raises:
            ValueError: when the network exists already for a different vocabulary.
        """
        if self.encoder is not None:
            if encoder != self.encoder:
                raise ValueError(
                    "the checkpoint's vocabulary differs from the data module's (were data.min_freq, "
                    "data.max_vocab_size, data.split_seed or data.source changed since training?)"
                )
            return
        hp = self.hparams
        self.net = RNNClassifier(
            len(encoder.vocabulary),
            hp.embedding_dim,
            hp.hidden_size,
            hp.num_layers,
            hp.bidirectional,
            hp.dropout,
            hp.cell,
        ).to(self.device)
        self.encoder = encoder

    def configure_model(self) -> None:
        # Lightning calls this after the data module's setup: its training vocabulary sizes the embedding.
        # Without a trainer (load_from_checkpoint) or without training data (predict), on_load_checkpoint builds it.
        try:
            encoder = getattr(self.trainer.datamodule, "encoder", None)
        except RuntimeError:  # not attached to a Trainer
            return
        if encoder is not None:
            self.set_encoder(encoder)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[ENCODER_KEY] = self._require_encoder().state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if ENCODER_KEY not in checkpoint:
            raise ValueError(f"the checkpoint has no {ENCODER_KEY!r}: it was not written by {type(self).__name__}")
        self.set_encoder(TextEncoder.from_state_dict(checkpoint[ENCODER_KEY]))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits of a :class:`~.batching.Batch`'s ``ids`` and ``lengths``."""
        if self.net is None:
            self._require_encoder()
        return self.net(ids, lengths)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch.ids, batch.lengths), batch.labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def predict_step(self, batch: list[str], batch_idx: int) -> dict[str, Any]:
        """``{"texts": batch, "probabilities": P(positive) per text}`` for a batch of raw reviews."""
        return {"texts": batch, "probabilities": self.predict_proba(batch)}

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        """Probability that each raw review is positive, in the order given (on the CPU).

        Raises:
            ValueError: when ``texts`` is empty or the model has no text encoder yet.
        """
        if not texts:
            raise ValueError("`texts` must hold at least one review")
        encoder = self._require_encoder()
        batch = collate([(encoder.encode(text), 0) for text in texts])
        was_training = self.training
        self.eval()
        sorted_probabilities = torch.sigmoid(self(batch.ids.to(self.device), batch.lengths)).cpu()
        self.train(was_training)
        probabilities = torch.empty_like(sorted_probabilities)
        probabilities[batch.order] = sorted_probabilities
        return probabilities

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after the callbacks' hook: in the GC arm this is the norm of the centralized gradient.
        norms = [
            p.grad.detach().norm() for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), on_step=True, on_epoch=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def _evaluate(self, batch: Batch, stage: str, metrics: MetricCollection) -> None:
        logits = self(batch.ids, batch.lengths)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        metrics.update(torch.sigmoid(logits), batch.labels.long())
        # The torchmetrics objects synchronize across DDP ranks by themselves; a plain loss tensor needs sync_dist.
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=len(batch), sync_dist=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=len(batch))

    def _require_encoder(self) -> TextEncoder:
        if self.encoder is None:
            raise ValueError(
                "the model has no vocabulary yet: train it on a data module (fit) or load a checkpoint "
                "(python train.py predict --ckpt_path RUN/checkpoints/<file>.ckpt --data.predict_file reviews.txt)"
            )
        return self.encoder
