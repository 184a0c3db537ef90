"""The confusion-matrix figure logged to TensorBoard."""

from __future__ import annotations

from matplotlib.figure import Figure
from torch import Tensor


def confusion_matrix_figure(confusion: Tensor, title: str = "") -> Figure:
    """Counts per (true, predicted) class, coloured by the share of each true class.

    Args:
        confusion: ``(C, C)`` counts, rows the true class, columns the prediction.
        title: the figure's title.

    Example:
        >>> import torch
        >>> fig = confusion_matrix_figure(torch.tensor([[3, 1], [0, 4]]))
        >>> fig.axes[0].get_xlabel()
        'predicted'
    """
    counts = confusion.long()
    shares = counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, label="share of the true class")
    n = counts.shape[0]
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    return figure
