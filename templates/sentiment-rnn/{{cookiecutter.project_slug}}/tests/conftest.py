"""Shared fixtures: the project folder, a local HTTP server, small archives in IMDB's layout."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parent.parent

# Real-looking reviews in IMDB's layout: <split>/<pos|neg>/<id>_<stars>.txt, with IMDB's "<br />" breaks.
IMDB_REVIEWS = {
    "train/pos/0_9.txt": "A wonderful film.<br /><br />The acting is superb and the story moving.",
    "train/pos/1_10.txt": "Wonderful! Superb acting, a moving story, a great ending.",
    "train/pos/2_8.txt": "Great fun, wonderful cast.<br />I loved it.",
    "train/pos/3_7.txt": "Moving and great. The cast is superb.",
    "train/neg/0_1.txt": "A dull, boring film.<br /><br />The acting is awful and the story a mess.",
    "train/neg/1_2.txt": "Awful. Boring plot, dull cast, a terrible ending.",
    "train/neg/2_3.txt": "Terrible film; I was bored.<br />Awful acting.",
    "train/neg/3_4.txt": "Dull and boring, the cast is awful.",
    "test/pos/0_10.txt": "Superb! A great, moving film with a marvellous score.",
    "test/pos/1_8.txt": "Wonderful acting.",
    "test/neg/0_1.txt": "Boring and awful, a dreadful waste.",
    "test/neg/1_2.txt": "Dull.",
}
# Files of the real archive that the reader must ignore.
IMDB_EXTRAS = {
    "imdb.vocab": "the\nand\n",
    "README": "Large Movie Review Dataset v1.0\n",
    "train/unsup/0_0.txt": "Unlabelled.",
}


def add_file(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_imdb_archive(path: Path, extra: dict[str, str] | None = None, symlink: str | None = None) -> str:
    """Write a .tar.gz in IMDB's layout (plus ``extra`` members, or a ``symlink`` member) and return its md5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {**IMDB_EXTRAS, **IMDB_REVIEWS}.items():
            add_file(tar, f"aclImdb/{name}", text)
        for name, text in (extra or {}).items():
            add_file(tar, name, text)
        if symlink is not None:
            link = tarfile.TarInfo(symlink)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
    return hashlib.md5(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served on 127.0.0.1 (a free port) by a thread: ``(folder, base URL)``."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just freed): what being offline looks like."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/aclImdb_v1.tar.gz"


@pytest.fixture
def in_project(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the project folder, as ``python train.py`` does (configs are relative paths)."""
    monkeypatch.chdir(PROJECT)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's
    return PROJECT


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    torch.set_num_threads(1)  # the tests' models are tiny; CI machines are small and shared
