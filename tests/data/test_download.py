"""download(): every way a mirror can fail falls through to the next one; size cap, deadline, stale .part files.

The mirrors are a raw TCP server on 127.0.0.1 that misbehaves a different way per path, so each failure is the
real one (a malformed status line, a short body, a reset), not a mocked exception.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lightning_gc.data import DownloadError, download, remove_stale_parts

BODY = bytes(range(256)) * 64  # 16 KiB
MD5 = hashlib.md5(BODY).hexdigest()


def _headers(length: int | None) -> bytes:
    extra = f"Content-Length: {length}\r\n" if length is not None else ""
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{extra}Connection: close\r\n\r\n".encode()


def _good(conn: socket.socket) -> None:
    conn.sendall(_headers(len(BODY)) + BODY)


def _bad_status_line(conn: socket.socket) -> None:
    conn.sendall(b"HTCPCP/1.0 418 I'm a teapot\r\n\r\n")  # http.client.BadStatusLine


def _incomplete(conn: socket.socket) -> None:
    conn.sendall(_headers(len(BODY)) + BODY[:1000])  # then the connection closes: IncompleteRead


def _reset(conn: socket.socket) -> None:
    conn.sendall(_headers(len(BODY)) + BODY[:1000])
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST


def _silent(conn: socket.socket) -> None:
    time.sleep(3)  # accepts, never answers: the read timeout


def _drip(conn: socket.socket) -> None:
    conn.sendall(_headers(None))
    for byte in BODY:  # a byte every 50 ms: never trips the read timeout, only the overall deadline
        conn.sendall(bytes([byte]))
        time.sleep(0.05)


def _announces_too_much(conn: socket.socket) -> None:
    conn.sendall(_headers(10 * len(BODY)) + BODY)


def _endless(conn: socket.socket) -> None:
    conn.sendall(_headers(None))
    while True:  # no Content-Length, never ends: only the size cap stops it
        conn.sendall(BODY)


def _wrong_body(conn: socket.socket) -> None:
    conn.sendall(_headers(len(BODY)) + bytes(len(BODY)))


def _not_found(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


BEHAVIOURS: dict[str, Callable[[socket.socket], None]] = {
    "good": _good,
    "bad_status_line": _bad_status_line,
    "incomplete": _incomplete,
    "reset": _reset,
    "silent": _silent,
    "drip": _drip,
    "announces_too_much": _announces_too_much,
    "endless": _endless,
    "wrong_body": _wrong_body,
    "not_found": _not_found,
}


@pytest.fixture
def server() -> Iterator[str]:
    """A base URL whose path ``/<behaviour>`` misbehaves that way (see BEHAVIOURS)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                request = conn.recv(4096).decode("latin-1")
                path = request.split(" ", 2)[1].strip("/") if " " in request else ""
                BEHAVIOURS.get(path, _not_found)(conn)
            except OSError:  # the client gave up (timeout, cap): expected
                pass

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.parametrize(
    ("behaviour", "reason", "options"),
    [
        ("bad_status_line", "BadStatusLine", {}),
        ("incomplete", "connection dropped after 1000", {}),
        ("reset", "onnection", {}),  # ConnectionResetError, or IncompleteRead if the RST comes after the read
        ("silent", "timed out", {"timeout": 0.5}),
        (
            "announces_too_much",
            f"the server announces {10 * len(BODY)} bytes, more than the {len(BODY)} allowed",
            {"size": len(BODY)},
        ),
        ("endless", f"more than the {len(BODY)} bytes allowed", {"size": len(BODY)}),
        ("endless", "more than the 100000 bytes allowed", {"max_bytes": 100_000}),
        ("wrong_body", "checksum mismatch", {}),
        ("not_found", "HTTP Error 404", {}),
    ],
)
def test_a_failing_mirror_falls_through_to_the_next(
    server: str, behaviour: str, reason: str, options: dict[str, float], tmp_path: Path
) -> None:
    destination = tmp_path / "data" / "file.bin"
    assert download([f"{server}/{behaviour}", f"{server}/good"], destination, MD5, **options) == destination
    assert destination.read_bytes() == BODY
    assert [p.name for p in destination.parent.iterdir()] == ["file.bin"]  # no .part left
    with pytest.raises(DownloadError) as error:
        download(f"{server}/{behaviour}", tmp_path / "other.bin", MD5, offline_hint="use the bundled data", **options)
    message = str(error.value)
    assert f"{server}/{behaviour}: " in message and reason in message and message.endswith("use the bundled data")
    assert not (tmp_path / "other.bin").exists()
    assert not list(tmp_path.glob("*.part"))


def test_the_deadline_covers_every_mirror(server: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download([f"{server}/drip", f"{server}/good"], tmp_path / "f.bin", MD5, deadline=1.0)
    assert f"{server}/drip: stopped at the 1 s deadline for the whole download" in str(error.value)
    assert f"{server}/good: not tried, the 1 s deadline had passed" in str(error.value)
    assert time.monotonic() - started < 30  # a bound far above the deadline, only against hanging forever


def test_a_valid_file_is_kept_and_a_corrupt_one_fetched_again(server: str, tmp_path: Path) -> None:
    destination = tmp_path / "f.bin"
    destination.write_bytes(BODY)
    assert download(f"{server}/not_found", destination, MD5) == destination  # not fetched at all
    destination.write_bytes(b"corrupt")
    download(f"{server}/good", destination, MD5)
    assert destination.read_bytes() == BODY


def test_part_files_of_dead_downloads_are_removed_live_ones_kept(server: str, tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".f.bin.{dead_pid}.abc123.part"
    legacy = tmp_path / ".f.bin.k2j3h4.part"  # written before the pid was part of the name
    live = tmp_path / f".f.bin.{os.getpid()}.def456.part"  # another download in this process, still running
    other = tmp_path / f".g.bin.{dead_pid}.x.part"  # another file's: not ours to judge
    for path in (stale, legacy, live, other):
        path.write_bytes(b"half")
    download(f"{server}/good", tmp_path / "f.bin", MD5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f.bin", live.name, other.name])
    assert remove_stale_parts(tmp_path / "g.bin") == [other]


def test_a_killed_download_leaves_a_part_file_that_the_next_one_removes(server: str, tmp_path: Path) -> None:
    code = (
        f"from lightning_gc.data import download; download({server + '/drip'!r}, {str(tmp_path / 'f.bin')!r}, {MD5!r})"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if list(tmp_path.glob("*.part")):
            break
        time.sleep(0.05)
    child.kill()
    child.wait(timeout=30)
    assert len(list(tmp_path.glob(".f.bin.*.part"))) == 1
    download(f"{server}/good", tmp_path / "f.bin", MD5)
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize(("option", "value"), [("timeout", 0), ("deadline", -1.0), ("size", 0), ("max_bytes", 0)])
def test_limits_must_be_positive(option: str, value: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"`{option}` must be a number > 0"):
        download("http://127.0.0.1:9/x", tmp_path / "x", MD5, **{option: value})
