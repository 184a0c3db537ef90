"""The figures logged to TensorBoard: the precision-recall curve and example images with their scores."""

from __future__ import annotations

from typing import Optional

from matplotlib.figure import Figure
from torch import Tensor


def pr_curve_figure(precision: Tensor, recall: Tensor, chosen: tuple[float, float], title: str = "") -> Figure:
    """The precision-recall curve, with the operating point of the chosen threshold marked.

    Args:
        precision: precisions along the curve (torchmetrics' ``binary_precision_recall_curve`` order).
        recall: recalls along the curve.
        chosen: ``(precision, recall)`` at the chosen threshold.
        title: the figure's title.

    Example:
        >>> import torch
        >>> fig = pr_curve_figure(torch.tensor([0.5, 1.0, 1.0]), torch.tensor([1.0, 0.5, 0.0]), (1.0, 0.5))
        >>> fig.axes[0].get_xlabel()
        'recall'
    """
    figure = Figure(figsize=(5, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.step(recall.cpu().numpy(), precision.cpu().numpy(), where="post", label="precision-recall curve")
    ax.plot([chosen[1]], [chosen[0]], "o", color="tab:red", label=f"threshold: P={chosen[0]:.3f}, R={chosen[1]:.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return figure


def examples_figure(
    images: Tensor,
    labels: Tensor,
    scores: Tensor,
    threshold: float,
    reconstructions: Optional[Tensor] = None,
    title: str = "",
) -> Figure:
    """One column per image: the image, then (autoencoder) its reconstruction and squared error map.

    Each column's title gives the true label, the score and the decision at ``threshold``.

    Args:
        images: ``(K, 1, H, W)`` in ``[0, 1]``.
        labels: ``(K,)`` 0 normal, 1 anomalous.
        scores: ``(K,)`` anomaly scores.
        threshold: the decision threshold (``score > threshold`` is flagged).
        reconstructions: ``(K, 1, H, W)``, for the autoencoder.
        title: the figure's title.

    Example:
        >>> import torch
        >>> fig = examples_figure(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), torch.tensor([0.1, 0.9]), 0.5)
        >>> fig.axes[1].get_title()
        'anomalous\\nscore 0.9 > 0.5'
    """
    rows = 1 if reconstructions is None else 3
    count = len(images)
    figure = Figure(figsize=(1.7 * count, 1.9 * rows), layout="constrained")
    axes = figure.subplots(rows, count, squeeze=False)
    for k in range(count):
        score = float(scores[k])
        decision = ">" if score > threshold else "<="
        axes[0, k].imshow(images[k, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(f"{'anomalous' if labels[k] else 'normal'}\nscore {score:.3g} {decision} {threshold:.3g}", fontsize=8)
        if reconstructions is not None:
            axes[1, k].imshow(reconstructions[k, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            error = (images[k, 0] - reconstructions[k, 0]).square().cpu().numpy()
            axes[2, k].imshow(error, cmap="magma", vmin=0, vmax=max(float(error.max()), 1e-6))
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    if reconstructions is not None:
        axes[1, 0].set_ylabel("reconstruction")
        axes[2, 0].set_ylabel("squared error")
    figure.suptitle(title, fontsize=9)
    return figure
