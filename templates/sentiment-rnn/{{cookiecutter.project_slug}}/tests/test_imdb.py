"""The IMDB download path, against a local HTTP server serving small archives in IMDB's layout."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from conftest import IMDB_REVIEWS, add_file, write_imdb_archive
from lightning_gc.data import ArchiveLayoutError, DownloadError, UnsafeArchiveError

from {{ cookiecutter.package_name }} import imdb
from {{ cookiecutter.package_name }}.data import SentimentDataModule
from {{ cookiecutter.package_name }}.tokenizer import tokenize


def serve_archive(http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, **archive) -> str:
    """Put an archive on the server, make its md5 the expected one, return its URL."""
    root, base = http_root
    monkeypatch.setattr(imdb, "MD5", write_imdb_archive(root / imdb.ARCHIVE, **archive))
    return f"{base}/{imdb.ARCHIVE}"


def prepared(data_dir: Path, url: str) -> SentimentDataModule:
    dm = SentimentDataModule(
        source="imdb", data_dir=str(data_dir), imdb_urls=[url], batch_size=4, min_freq=2, val_fraction=0.25
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_good_archive_is_downloaded_extracted_read_and_cached(
    http_root, monkeypatch, tmp_path, closed_port_url
) -> None:
    url = serve_archive(http_root, monkeypatch)
    data_dir = tmp_path / "data"
    dm = prepared(data_dir, url)

    assert {name: len(part) for name, part in dm.splits.items()} == {"train": 6, "val": 2, "test": 4}
    test_labels = sorted(int(n.startswith("test/pos")) for n in IMDB_REVIEWS if n.startswith("test/"))
    assert sorted(dm.splits["test"].labels.tolist()) == test_labels
    # Every test review decodes to its own tokens (words outside the training vocabulary as <unk>).
    vocabulary = dm.encoder.vocabulary
    decoded = sorted(" ".join(vocabulary.tokens[i] for i in dm.splits["test"][k][0].tolist()) for k in range(4))
    expected = sorted(
        " ".join(t if t in vocabulary.tokens else "<unk>" for t in tokenize(text))
        for name, text in IMDB_REVIEWS.items()
        if name.startswith("test/")
    )
    assert decoded == expected
    assert "br" not in vocabulary.tokens and "<" not in vocabulary.tokens
    assert (data_dir / imdb.ARCHIVE).is_file() and dm.imdb_cache_path.is_file()
    batch = next(iter(dm.train_dataloader()))
    assert batch.lengths.tolist() == sorted(batch.lengths.tolist(), reverse=True)

    # Prepared once: a second run reads the cache, without network and without the archive.
    (data_dir / imdb.ARCHIVE).unlink()
    again = prepared(data_dir, closed_port_url)
    assert again.encoder == dm.encoder
    assert all(again.splits[n].ids.equal(dm.splits[n].ids) for n in ("train", "val", "test"))


def test_corrupt_archive_is_refused_and_not_kept(http_root, monkeypatch, tmp_path) -> None:
    url = serve_archive(http_root, monkeypatch)
    served = http_root[0] / imdb.ARCHIVE
    served.write_bytes(served.read_bytes()[:-100] + bytes(100))  # same size, different bytes
    data_dir = tmp_path / "data"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        prepared(data_dir, url)
    assert not (data_dir / imdb.ARCHIVE).exists() and not (data_dir / imdb.ROOT).exists()
    assert not list(data_dir.glob("*.part"))


@pytest.mark.parametrize(
    "archive, reason",
    [
        ({"extra": {"aclImdb/../../escaped.txt": "owned"}}, "escapes"),
        ({"extra": {"/tmp/sentiment-rnn-test-absolute-escape.txt": "owned"}}, "escapes"),
        ({"symlink": "aclImdb/train/pos/9_9.txt"}, "not a regular file"),
    ],
)
def test_unsafe_archive_is_refused_before_anything_is_written(
    http_root, monkeypatch, tmp_path, archive, reason
) -> None:
    url = serve_archive(http_root, monkeypatch, **archive)
    data_dir = tmp_path / "deep" / "data"
    with pytest.raises(UnsafeArchiveError, match=reason):
        prepared(data_dir, url)
    assert not (data_dir / imdb.ROOT).exists()
    assert (
        not (tmp_path / "deep" / "escaped.txt").exists()
        and not Path("/tmp/sentiment-rnn-test-absolute-escape.txt").exists()
    )
    assert not list(data_dir.glob("imdb-prepared-*.pt"))


def test_offline_error_names_the_offline_source(tmp_path, closed_port_url) -> None:
    with pytest.raises(DownloadError) as error:
        prepared(tmp_path / "data", closed_port_url)
    message = str(error.value)
    assert closed_port_url in message and "--data.source rotten_tomatoes" in message and imdb.MD5 in message


def test_archive_without_imdb_layout_is_reported(http_root, monkeypatch, tmp_path) -> None:
    url = serve_archive(http_root, monkeypatch)
    data_dir = tmp_path / "data"
    (data_dir / imdb.ROOT / "test").mkdir(parents=True)
    imdb.fetch_imdb(data_dir, [url], imdb.MD5)
    for review in (data_dir / imdb.ROOT / "test" / "pos").iterdir():
        review.unlink()
    with pytest.raises(FileNotFoundError, match="test/{pos,neg}/<id>_<stars>.txt"):
        imdb.read_imdb(data_dir / imdb.ROOT)


def test_archive_without_the_imdb_folder_is_refused_clearly(http_root, monkeypatch, tmp_path) -> None:
    root, base = http_root
    with tarfile.open(root / imdb.ARCHIVE, "w:gz") as tar:  # reviews at the top, no aclImdb/ folder
        add_file(tar, "train/pos/0_9.txt", "Great.")
    monkeypatch.setattr(imdb, "MD5", hashlib.md5((root / imdb.ARCHIVE).read_bytes()).hexdigest())
    data_dir = tmp_path / "data"
    with pytest.raises(ArchiveLayoutError, match=r"every member should be in aclImdb/.*'train/pos/0_9.txt'"):
        imdb.fetch_imdb(data_dir, [f"{base}/{imdb.ARCHIVE}"], imdb.MD5)
    assert not (data_dir / "train").exists() and not (data_dir / imdb.ROOT).exists()


def test_a_file_that_is_not_a_tar_archive_is_refused_clearly(http_root, monkeypatch, tmp_path) -> None:
    root, base = http_root
    (root / imdb.ARCHIVE).write_bytes(b"<html>Moved</html>")
    monkeypatch.setattr(imdb, "MD5", hashlib.md5(b"<html>Moved</html>").hexdigest())
    with pytest.raises(ArchiveLayoutError, match="is not a readable tar archive"):
        imdb.fetch_imdb(tmp_path / "data", [f"{base}/{imdb.ARCHIVE}"], imdb.MD5)
