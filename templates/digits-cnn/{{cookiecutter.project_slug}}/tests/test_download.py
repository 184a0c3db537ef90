"""Downloading the full MNIST, against a local HTTP server on 127.0.0.1 serving small IDX files written here."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lightning_gc.data import DownloadError

from {{ cookiecutter.package_name }} import mnist
from {{ cookiecutter.package_name }}.data import DigitsDataModule
from {{ cookiecutter.package_name }}.mnist import download_mnist, load_mnist, read_idx

SIZES = {"train": 12, "t10k": 5}


def _idx(array: np.ndarray) -> bytes:
    """IDX encoding written independently of the reader: zero, zero, type 0x08 (ubyte), ndim, big-endian sizes."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {s: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
            for s, n in SIZES.items()}


@pytest.fixture(scope="module")
def files(digits) -> dict[str, bytes]:
    out = {}
    for split, (images, labels) in digits.items():
        out[f"{split}-images-idx3-ubyte.gz"] = gzip.compress(_idx(images), mtime=0)
        out[f"{split}-labels-idx1-ubyte.gz"] = gzip.compress(_idx(labels), mtime=0)
    return out


@pytest.fixture(scope="module")
def checksums(files) -> dict[str, str]:
    return {name: hashlib.md5(data).hexdigest() for name, data in files.items()}


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/good/NAME`` serves the file, ``/corrupt/NAME`` a copy with one byte changed, ``/drop/NAME`` closes the
    connection halfway through the announced length, anything else is a 404."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(self.path)
        _, mode, name = self.path.split("/", 2)
        data = self.files.get(name)
        if data is None or mode not in ("good", "corrupt", "drop"):
            self.send_error(404)
            return
        if mode == "corrupt":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if mode == "drop" else data)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(files) -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (_Handler,), {"files": files, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/good"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in _names())


def _names() -> set[str]:
    return {f"{s}-{kind}-idx{d}-ubyte.gz" for s in SIZES for kind, d in (("images", 3), ("labels", 1))}


def test_bad_mirrors_are_skipped_and_the_files_read_back(server, checksums, digits, tmp_path) -> None:
    base, requests = server
    mirrors = [f"{base}/drop", f"{base}/corrupt", f"{base}/missing", f"{base}/good"]
    paths = download_mnist(tmp_path, mirrors, checksums)
    assert sorted(paths) == sorted(checksums) and _leftovers(tmp_path) == []  # no temporary files left
    assert all(hashlib.md5(p.read_bytes()).hexdigest() == checksums[name] for name, p in paths.items())
    assert len(requests) == 4 * len(checksums)  # every mirror was tried, in order, for every file
    assert [r.split("/")[1] for r in requests[:4]] == ["drop", "corrupt", "missing", "good"]
    for split, (images, labels) in digits.items():
        got_images, got_labels = load_mnist(tmp_path, split)
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_valid_files_are_kept_and_a_corrupt_one_is_fetched_again(server, checksums, tmp_path) -> None:
    base, requests = server
    download_mnist(tmp_path, [f"{base}/good"], checksums)
    requests.clear()
    download_mnist(tmp_path, [f"{base}/good"], checksums)
    assert requests == []
    damaged = tmp_path / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-3])
    download_mnist(tmp_path, [f"{base}/good"], checksums)
    assert requests == ["/good/t10k-labels-idx1-ubyte.gz"]
    assert hashlib.md5(damaged.read_bytes()).hexdigest() == checksums[damaged.name]


def test_dropped_connection_leaves_nothing_and_says_so(server, checksums, tmp_path) -> None:
    base, _ = server
    with pytest.raises(DownloadError, match="connection dropped") as err:
        download_mnist(tmp_path, [f"{base}/drop"], checksums)
    assert "mnist-5k" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_error_names_the_offline_source(checksums, tmp_path) -> None:
    with pytest.raises(DownloadError, match="--data.source mnist-5k"):
        download_mnist(tmp_path / "data", [_closed_port_url()], checksums)
    assert list((tmp_path / "data").iterdir()) == []


def test_datamodule_downloads_then_splits(server, checksums, digits, monkeypatch, tmp_path) -> None:
    base, _ = server
    monkeypatch.setattr(mnist, "MNIST_FILES", checksums)
    dm = DigitsDataModule(source="mnist", data_dir=str(tmp_path), mirrors=[f"{base}/good"], val_size=2)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 2, 5)
    assert sorted(dm.train_set.tensors[1].tolist() + dm.val_set.tensors[1].tolist()) == sorted(
        digits["train"][1].tolist())
    assert dm.test_set.tensors[1].tolist() == digits["t10k"][1].tolist()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\x00\x01\x08\x01", "not an IDX file"), (bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"abc", "payload")],
)
def test_malformed_idx_is_refused(content: bytes, message: str, tmp_path) -> None:
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_idx(path)
