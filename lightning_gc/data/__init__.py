"""Data helpers shared by the template projects."""

from lightning_gc.data.download import DownloadError, UnsafeArchiveError, download, md5sum, safe_extract_tar

__all__ = ["DownloadError", "UnsafeArchiveError", "download", "md5sum", "safe_extract_tar"]
