"""Getting public data sets onto disk safely: checksums, atomic writes, mirrors, safe extraction.

Shared by the template projects so that each of them downloads the same careful way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


class DownloadError(RuntimeError):
    """No mirror delivered a file with the expected checksum."""


class UnsafeArchiveError(RuntimeError):
    """An archive member would escape the target directory, or is a link or a device."""


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    urls: str | Sequence[str],
    destination: str | os.PathLike,
    md5: str,
    *,
    timeout: float = 30.0,
    offline_hint: str = "",
) -> Path:
    """Fetch ``destination`` from the first mirror that serves it with checksum ``md5``.

    A file already present with the right checksum is kept; a corrupt one is fetched again. Data is
    written to a temporary file in the destination's folder and renamed into place only once verified,
    so an interrupted download never leaves a file that looks complete.

    Args:
        urls: one URL or mirrors to try in order.
        destination: the file to write.
        md5: expected hex md5 of the file.
        timeout: seconds to wait on each connection.
        offline_hint: appended to the error when every mirror fails (say what to use offline).

    Returns:
        ``destination`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: when no mirror delivered the file with the right checksum.

    Example:
        >>> download("https://example.invalid/t10k-labels-idx1-ubyte.gz", "data/t10k-labels-idx1-ubyte.gz",
        ...          md5="ec29112dd5afa0611ce80d1b7f02629c")  # doctest: +SKIP
    """
    destination = Path(destination)
    if destination.is_file() and md5sum(destination) == md5:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in [urls] if isinstance(urls, str) else urls:
        try:
            _fetch_verified(url, destination, md5, timeout)
            return destination
        except (OSError, urllib.error.URLError, DownloadError) as err:
            errors.append(f"{url}: {err}")
    message = f"could not download {destination.name}:\n  " + "\n  ".join(errors)
    raise DownloadError(f"{message}\n{offline_hint}".rstrip())


def _fetch_verified(url: str, destination: Path, md5: str, timeout: float) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    try:
        with os.fdopen(fd, "wb") as tmp, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, tmp, 1 << 20)
            written = tmp.tell()
        if expected is not None and written != int(expected):
            raise DownloadError(f"connection dropped after {written} of {expected} bytes")
        actual = md5sum(tmp_name)
        if actual != md5:
            raise DownloadError(f"checksum mismatch: md5 {actual}, expected {md5}")
        os.replace(tmp_name, destination)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def safe_extract_tar(archive: str | os.PathLike, target_dir: str | os.PathLike) -> Path:
    """Extract a tar archive, refusing any member that is a link, a device, or would land outside ``target_dir``.

    Every member is checked before anything is written, then the standard library's ``"data"`` extraction
    filter is applied as a second line of defence.

    Raises:
        UnsafeArchiveError: naming the first offending member.
    """
    target = Path(target_dir).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            if not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(f"refusing archive member {member.name!r}: not a regular file or directory")
            destination = (target / member.name).resolve()
            if destination != target and target not in destination.parents:
                raise UnsafeArchiveError(f"refusing archive member {member.name!r}: it escapes {target}")
        tar.extractall(target, members=members, filter="data")
    return target
