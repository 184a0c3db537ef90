"""Fixtures: MedMNIST-format files written here, and a local HTTP server on 127.0.0.1 that serves them."""

from __future__ import annotations

import hashlib
import http.server
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
SPLIT_SIZES = {"train": 40, "val": 20, "test": 20}


def write_medmnist(path: Path, name: str, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A small file in MedMNIST's exact format: uint8 ``(N, S, S)`` images, uint8 ``(N, C)`` 0/1 labels.

    Pneumonia images get a bright square so that a model can learn something in a few steps.
    """
    rng = np.random.default_rng(seed)
    columns = 1 if name == "pneumoniamnist" else 14
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        labels = (rng.random((n, columns)) < (0.5 if columns == 1 else 0.08)).astype(np.uint8)
        images = rng.integers(0, 120, (n, size, size), dtype=np.uint8)
        images[labels.any(axis=1), size // 4 : size // 2, size // 4 : size // 2] = 250
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez_compressed(path, **arrays)
    return arrays


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path = Path()
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(self.path)
        file = self.root / self.path.split("?")[0].lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """``(url_template, served_folder, requests)``: files put in the folder are served as ``/<name>?download=1``."""
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Handler", (_Handler,), {"root": served, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield "http://127.0.0.1:%d/{file}?download=1" % httpd.server_address[1], served, handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def in_project(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(PROJECT)  # the configs use paths relative to the project
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's
    return PROJECT
