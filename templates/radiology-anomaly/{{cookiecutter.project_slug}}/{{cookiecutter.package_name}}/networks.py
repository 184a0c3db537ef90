"""The two networks: a CNN that scores anomalies directly, and a convolutional autoencoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ConvClassifier(nn.Module):
    """Stages of strided 3x3 convolution, batch norm and ReLU, then global max-pooling and one logit.

    Each stage halves the side (stride 2 rather than max-pooling: a quarter of the work at full resolution).
    Global *max* pooling because an image is anomalous when any region of it is: a small lesion must not be
    averaged away.

    Args:
        channels: output channels of each stage.

    Example:
        >>> ConvClassifier((8, 16))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2])
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, 1)

    def forward(self, x: Tensor) -> Tensor:
        """One logit per image (positive: anomalous)."""
        return self.head(self.features(x)).squeeze(1)


class ConvAutoencoder(nn.Module):
    """Strided 3x3 convolutions, a dense bottleneck, ``ConvTranspose2d`` back up, sigmoid output.

    Each encoder stage halves the side; each decoder stage, a 4x4 transposed convolution with stride 2,
    doubles it and mirrors one encoder stage (the last one straight to the single output channel, so that no
    layer works on many channels at full resolution). The bottleneck is a vector of ``latent_dim`` numbers
    for the whole image rather than a small feature map: a feature map can carry a local blob through, a
    global code must describe the image as a whole, and lesions are what it never learnt to describe.
    Sides that do not halve evenly (28 -> 14 -> 7 -> 4) come back larger and are cropped at the
    bottom-right, which keeps every pixel aligned with its input.

    Args:
        channels: output channels of each encoder stage (the decoder mirrors them).
        latent_dim: size of the bottleneck vector.
        image_size: side of the (square) input images.

    Example:
        >>> ConvAutoencoder((8, 16), latent_dim=4, image_size=28)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, channels: Sequence[int], latent_dim: int, image_size: int) -> None:
        super().__init__()
        widths = [1, *channels]
        encoder: list[nn.Module] = []
        for previous, width in zip(widths[:-1], widths[1:]):
            encoder += [nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        side = image_size
        for _ in channels:
            side = (side + 1) // 2  # what a 3x3 convolution with stride 2 and padding 1 leaves
        self.code_shape = (widths[-1], side, side)
        features = widths[-1] * side * side
        encoder += [nn.Flatten(), nn.Linear(features, latent_dim)]
        decoder: list[nn.Module] = [nn.Linear(latent_dim, features), nn.ReLU(), nn.Unflatten(1, self.code_shape)]
        mirrored = list(reversed(widths[1:]))
        for previous, width in zip(mirrored, mirrored[1:]):
            decoder += [nn.ConvTranspose2d(previous, width, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        decoder.append(nn.ConvTranspose2d(mirrored[-1], 1, 4, stride=2, padding=1))
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction, in ``[0, 1]``, of the same shape as ``x``."""
        out = self.decoder(self.encoder(x))
        return torch.sigmoid(out[..., : x.shape[-2], : x.shape[-1]])
