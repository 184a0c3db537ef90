"""Getting public data sets onto disk safely: checksums, atomic writes, mirrors, limits, safe extraction.

Shared by the template projects so that each of them downloads the same careful way.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

# Without a known size, no file is allowed to grow past this (the largest file a template fetches, IMDB's
# archive, is 84 MB).
DEFAULT_MAX_BYTES = 2 << 30
# Seconds for a whole download() call, all mirrors together; a server that drips bytes never trips the
# per-read `timeout`, this stops it.
DEFAULT_DEADLINE = 1800.0
_CHUNK = 1 << 20
# Suffix of the temporary file a download writes before it is verified and renamed into place.
PART_SUFFIX = ".part"


class DownloadError(RuntimeError):
    """No mirror delivered a file with the expected checksum."""


class UnsafeArchiveError(RuntimeError):
    """An archive member would escape the target directory, or is a link or a device."""


class ArchiveLayoutError(RuntimeError):
    """An archive is not a tar file, or does not hold the folder it should."""


def md5sum(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """Hex md5 of a file, read in chunks.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     md5sum(f.name)
        'd41d8cd98f00b204e9800998ecf8427e'
    """
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    urls: str | Sequence[str],
    destination: str | os.PathLike[str],
    md5: str,
    *,
    size: int | None = None,
    timeout: float = 30.0,
    deadline: float = DEFAULT_DEADLINE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    offline_hint: str = "",
) -> Path:
    """Fetch ``destination`` from the first mirror that serves it with checksum ``md5``.

    A file already present with the right checksum is kept; a corrupt one is fetched again. Data is
    written to a temporary ``.part`` file in the destination's folder and renamed into place only once
    verified, so an interrupted download never leaves a file that looks complete; ``.part`` files that
    earlier, killed downloads of the same file left behind are removed first. Any failure of one mirror
    (refused or reset connection, timeout, a malformed HTTP response, a short or oversized body, a wrong
    checksum) moves on to the next.

    Args:
        urls: one URL or mirrors to try in order.
        destination: the file to write.
        md5: expected hex md5 of the file.
        size: expected size in bytes, where known: a response announcing or delivering more is cut off.
        timeout: seconds to wait for each connection and each read.
        deadline: seconds for the whole call, every mirror included.
        max_bytes: the most any response may deliver when ``size`` is not known.
        offline_hint: appended to the error when every mirror fails (say what to use offline).

    Returns:
        ``destination`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: when no mirror delivered the file with the right checksum, each mirror's reason listed.
        ValueError: for a ``timeout``, ``deadline``, ``size`` or ``max_bytes`` that is not positive.

    Example:
        >>> download("https://example.invalid/t10k-labels-idx1-ubyte.gz", "data/t10k-labels-idx1-ubyte.gz",
        ...          md5="ec29112dd5afa0611ce80d1b7f02629c", size=4542)  # doctest: +SKIP
    """
    for name, value in (("timeout", timeout), ("deadline", deadline), ("max_bytes", max_bytes), ("size", size)):
        if value is not None and not value > 0:
            raise ValueError(f"`{name}` must be a number > 0, got {value!r}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(destination)
    if destination.is_file() and md5sum(destination) == md5:
        return destination
    cap = size if size is not None else max_bytes
    stop_at = time.monotonic() + deadline
    errors = []
    for url in [urls] if isinstance(urls, str) else urls:
        if time.monotonic() >= stop_at:
            errors.append(f"{url}: not tried, the {deadline:g} s deadline had passed")
            continue
        try:
            _fetch_verified(url, destination, md5, timeout, cap, stop_at)
            return destination
        # http.client.HTTPException covers BadStatusLine, IncompleteRead, LineTooLong, RemoteDisconnected is
        # an OSError too; ValueError: a URL that urllib cannot parse.
        except (OSError, http.client.HTTPException, DownloadError, ValueError) as err:
            reason = _describe(err)
            if time.monotonic() >= stop_at:
                reason = f"stopped at the {deadline:g} s deadline for the whole download ({reason})"
            errors.append(f"{url}: {reason}")
    message = f"could not download {destination.name}:\n  " + "\n  ".join(errors)
    raise DownloadError(f"{message}\n{offline_hint}".rstrip())


def remove_stale_parts(destination: str | os.PathLike[str]) -> list[Path]:
    """Remove the ``.part`` files that downloads of ``destination`` left behind in processes now gone.

    Returns:
        The files removed.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     stale = Path(tmp, ".t.gz.999999999.x1.part")
        ...     _ = stale.write_bytes(b"half")
        ...     [p.name for p in remove_stale_parts(Path(tmp, "t.gz"))]
        ['.t.gz.999999999.x1.part']
    """
    destination = Path(destination)
    removed = []
    for part in destination.parent.glob(f".{destination.name}.*{PART_SUFFIX}"):
        owner = part.name[len(destination.name) + 2 :].split(".", 1)[0]
        if not (owner.isdigit() and _process_alive(int(owner))):
            part.unlink(missing_ok=True)
            removed.append(part)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:  # not a pid at all
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _describe(err: BaseException) -> str:
    if isinstance(err, http.client.IncompleteRead):
        return f"connection dropped after {len(err.partial)} bytes ({type(err).__name__})"
    text = str(err) or repr(err)
    return text if isinstance(err, DownloadError) else f"{type(err).__name__}: {text}"


def _fetch_verified(url: str, destination: Path, md5: str, timeout: float, cap: int, stop_at: float) -> None:
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{destination.name}.{os.getpid()}.", suffix=PART_SUFFIX, dir=destination.parent
    )
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as tmp, urllib.request.urlopen(url, timeout=_left(stop_at, timeout)) as response:
            announced = response.headers.get("Content-Length")
            expected = int(announced) if announced is not None and announced.isdigit() else None
            if expected is not None and expected > cap:
                raise DownloadError(f"the server announces {expected} bytes, more than the {cap} allowed")
            written = 0
            while chunk := _read(response, min(_CHUNK, cap + 1 - written), stop_at, timeout):
                written += len(chunk)
                if written > cap:
                    raise DownloadError(f"more than the {cap} bytes allowed; stopped")
                digest.update(chunk)
                tmp.write(chunk)
        if expected is not None and written != expected:
            raise DownloadError(f"connection dropped after {written} of {expected} bytes")
        if digest.hexdigest() != md5:
            raise DownloadError(f"checksum mismatch: md5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp_name, destination)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _left(stop_at: float, timeout: float) -> float:
    left = stop_at - time.monotonic()
    if left <= 0:
        raise DownloadError("the overall deadline passed")
    return min(timeout, left)


def _read(response: http.client.HTTPResponse, amount: int, stop_at: float, timeout: float) -> bytes:
    """Up to ``amount`` bytes, each socket wait bounded by both the read timeout and the overall deadline."""
    sock = getattr(getattr(response, "fp", None), "raw", None)
    sock = getattr(sock, "_sock", None)
    if sock is not None:
        sock.settimeout(_left(stop_at, timeout))
    elif time.monotonic() >= stop_at:
        raise DownloadError("the overall deadline passed")
    return response.read1(amount) if hasattr(response, "read1") else response.read(amount)


def safe_extract_tar(
    archive: str | os.PathLike[str], target_dir: str | os.PathLike[str], *, root: str | None = None
) -> Path:
    """Extract a tar archive, refusing any member that is a link, a device, or would land outside ``target_dir``.

    Every member is checked before anything is written, then the standard library's ``"data"`` extraction
    filter is applied as a second line of defence.

    Args:
        archive: the tar file (any compression tarfile reads).
        target_dir: where to extract.
        root: when given, the folder every member must be in (``"aclImdb"``): an archive without it is refused.

    Raises:
        UnsafeArchiveError: naming the first offending member.
        ArchiveLayoutError: the file is not a tar archive, or not every member is under ``root``.
    """
    target = Path(target_dir).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with _open_tar(archive) as tar:
        members = tar.getmembers()
        for member in members:
            if not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(f"refusing archive member {member.name!r}: not a regular file or directory")
            destination = (target / member.name).resolve()
            if destination != target and target not in destination.parents:
                raise UnsafeArchiveError(f"refusing archive member {member.name!r}: it escapes {target}")
        if root is not None:
            outside = [m.name for m in members if Path(m.name).parts[:1] != (root,)]
            if outside or not members:
                shown = ", ".join(repr(n) for n in outside[:3]) or "none"
                raise ArchiveLayoutError(
                    f"{os.fspath(archive)!r} is not the expected archive: every member should be in {root}/, "
                    f"found {len(outside)} outside it (e.g. {shown}) of {len(members)}"
                )
        tar.extractall(target, members=members, filter="data")
    return target


def _open_tar(archive: str | os.PathLike[str]) -> tarfile.TarFile:
    try:
        return tarfile.open(archive)
    except (tarfile.TarError, EOFError) as err:
        raise ArchiveLayoutError(f"{os.fspath(archive)!r} is not a readable tar archive: {err}") from err
