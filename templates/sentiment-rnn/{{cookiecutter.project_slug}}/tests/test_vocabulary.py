"""The vocabulary: minimum frequency, unknown token, training split only, saved with the encoder."""

from __future__ import annotations

from collections import Counter

import pytest

from {{ cookiecutter.package_name }}.corpus import LabelledTexts
from {{ cookiecutter.package_name }}.encoded import encode_splits
from {{ cookiecutter.package_name }}.encoder import TextEncoder
from {{ cookiecutter.package_name }}.tokenizer import TOKENIZER_VERSION, tokenize
from {{ cookiecutter.package_name }}.vocabulary import Vocabulary


def test_min_freq_max_size_and_order() -> None:
    texts = [["b", "a", "c"], ["b", "a"], ["b", "d"]]
    assert Vocabulary.build(texts, min_freq=1).tokens == ["<pad>", "<unk>", "b", "a", "c", "d"]
    assert Vocabulary.build(texts, min_freq=2).tokens == ["<pad>", "<unk>", "b", "a"]
    assert Vocabulary.build(texts, min_freq=1, max_size=3).tokens == ["<pad>", "<unk>", "b", "a", "c"]
    assert Vocabulary.build(texts, min_freq=2).encode(["a", "zzz", "c"]) == [3, 1, 1]


def test_special_tokens_in_text_are_ordinary_unknowns() -> None:
    vocabulary = Vocabulary.build([["<unk>", "<pad>", "x"]] * 3, min_freq=1)
    assert vocabulary.tokens == ["<pad>", "<unk>", "x"]


@pytest.mark.parametrize(
    "kwargs, argument", [({"min_freq": 0}, "min_freq"), ({"min_freq": 1.5}, "min_freq"), ({"max_size": 0}, "max_size")]
)
def test_invalid_options_name_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        Vocabulary.build([["a"]], **kwargs)


def test_vocabulary_comes_from_the_training_split_only() -> None:
    splits = {
        "train": LabelledTexts(["A fine film, a fine cast.", "A poor film!"], [1, 0]),
        "val": LabelledTexts(["Sublime sublime sublime film"], [1]),
        "test": LabelledTexts(["Poor, poor, poor."], [0]),
    }
    encoder, encoded = encode_splits(splits, min_freq=2, max_vocab_size=None, max_length=None)
    train_counts = Counter(t for text in splits["train"].texts for t in tokenize(text))
    expected = {t for t, c in train_counts.items() if c >= 2}
    assert set(encoder.vocabulary.tokens[2:]) == expected  # "sublime" and "poor" (x4 outside train) are not in
    ids, label = encoded["val"][0]
    assert ids.tolist() == [1, 1, 1, encoder.vocabulary.tokens.index("film")] and label == 1


def test_encoder_state_round_trip_and_tokenizer_version_check() -> None:
    encoder = TextEncoder(Vocabulary(["<pad>", "<unk>", "ok"]), max_length=7)
    state = encoder.state_dict()
    assert TextEncoder.from_state_dict(state) == encoder
    with pytest.raises(ValueError, match="tokenizer version"):
        TextEncoder.from_state_dict({**state, "tokenizer": TOKENIZER_VERSION + "-old"})
