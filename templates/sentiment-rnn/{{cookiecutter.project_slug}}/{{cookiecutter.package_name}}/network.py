"""The network: embedding, (bi)LSTM or GRU over packed sequences, linear classifier."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

Cell = Literal["lstm", "gru"]
CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class RNNClassifier(nn.Module):
    """One logit per review: positive when ``> 0``.

    The review is read by the recurrent layers as a packed sequence (padding never enters the recurrence);
    the last layer's final hidden state of each direction feeds the classifier.

    Args:
        vocab_size: rows of the embedding table.
        embedding_dim: size of a token embedding.
        hidden_size: recurrent state size per direction.
        num_layers: stacked recurrent layers.
        bidirectional: read each review both ways.
        dropout: on the embeddings, between recurrent layers and before the classifier.
        cell: ``"lstm"`` or ``"gru"``.
        pad_index: the padding token's id (its embedding stays zero).

    Example:
        >>> net = RNNClassifier(vocab_size=10, embedding_dim=4, hidden_size=3, num_layers=1, bidirectional=True,
        ...                     dropout=0.0, cell="gru")
        >>> net(torch.tensor([[4, 5, 6], [7, 0, 0]]), torch.tensor([3, 1])).shape
        torch.Size([2])
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        hidden_size: int,
        num_layers: int,
        bidirectional: bool,
        dropout: float,
        cell: Cell,
        pad_index: int = 0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_index)
        self.rnn = CELLS[cell](
            embedding_dim,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size * (2 if bidirectional else 1), 1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch,)`` of padded ``ids`` ``(batch, longest)`` whose ``lengths`` decrease."""
        embedded = self.dropout(self.embedding(ids))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=True)
        _, hidden = self.rnn(packed)
        if isinstance(hidden, tuple):  # LSTM: (h_n, c_n)
            hidden = hidden[0]
        directions = 2 if self.rnn.bidirectional else 1
        last_layer = hidden[-directions:]  # (directions, batch, hidden_size)
        features = last_layer.transpose(0, 1).reshape(ids.shape[0], -1)
        return self.classifier(self.dropout(features)).squeeze(-1)
