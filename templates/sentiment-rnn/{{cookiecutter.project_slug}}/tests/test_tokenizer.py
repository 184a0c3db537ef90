"""Tokenization and encoding edge cases: empty reviews, punctuation only, non-ASCII text, IMDB markup."""

from __future__ import annotations

import pytest

from {{ cookiecutter.package_name }}.encoder import TextEncoder
from {{ cookiecutter.package_name }}.tokenizer import tokenize
from {{ cookiecutter.package_name }}.vocabulary import Vocabulary


@pytest.mark.parametrize("text", ["", "   ", "\n\t \r\n", "<br /><br />"])
def test_empty_review_has_no_tokens_and_encodes_to_one_unknown(text: str) -> None:
    assert tokenize(text) == []
    encoder = TextEncoder(Vocabulary(["<pad>", "<unk>", "good"]))
    assert encoder.encode(text) == [Vocabulary.unk_index]


def test_punctuation_only_review_keeps_every_mark() -> None:
    assert tokenize("?!...") == ["?", "!", ".", ".", "."]
    assert tokenize(":( !!") == [":", "(", "!", "!"]
    encoder = TextEncoder(Vocabulary(["<pad>", "<unk>", "!"]))
    assert encoder.encode("?!!") == [1, 2, 2]


def test_non_ascii_letters_accents_and_symbols() -> None:
    assert tokenize("Amélie était GÉNIALE — 10/10 😀") == ["amélie", "était", "géniale", "—", "10", "/", "10", "😀"]
    # A decomposed accent (e + combining acute) is the same word as the composed one.
    assert tokenize("Ame\u0301lie") == tokenize("Amélie") == ["amélie"]
    # Full-width letters fold to ASCII; scripts without case keep their letters.
    assert tokenize("ＧＲＥＡＴ") == ["great"]
    assert tokenize("Отличный фильм, 好看!") == ["отличный", "фильм", ",", "好看", "!"]


def test_imdb_line_breaks_entities_and_typographic_quotes() -> None:
    assert tokenize("Great.<br /><br />Really<BR/>great<br>fun") == ["great", ".", "really", "great", "fun"]
    assert tokenize("Tom &amp; Jerry") == ["tom", "&", "jerry"]
    assert tokenize("don’t “love” it") == tokenize('don\'t "love" it') == ["don't", '"', "love", '"', "it"]


def test_words_keep_inner_apostrophes_and_split_on_hyphens() -> None:
    assert tokenize("It's a well-made 90's film_noir") == ["it's", "a", "well", "-", "made", "90's", "film", "noir"]


def test_truncation_keeps_the_first_tokens() -> None:
    encoder = TextEncoder(Vocabulary(["<pad>", "<unk>", "a", "b"]), max_length=2)
    assert encoder.encode("b a b a") == [3, 2]


@pytest.mark.parametrize("bad", [None, 3, b"bytes"])
def test_tokenize_refuses_non_strings(bad: object) -> None:
    with pytest.raises(ValueError, match="`text` must be a string"):
        tokenize(bad)  # type: ignore[arg-type]
