"""Data helpers shared by the template projects."""

from lightning_gc.data.download import (
    ArchiveLayoutError,
    DownloadError,
    UnsafeArchiveError,
    download,
    md5sum,
    remove_stale_parts,
    safe_extract_tar,
)

__all__ = [
    "ArchiveLayoutError",
    "DownloadError",
    "UnsafeArchiveError",
    "download",
    "md5sum",
    "remove_stale_parts",
    "safe_extract_tar",
]
