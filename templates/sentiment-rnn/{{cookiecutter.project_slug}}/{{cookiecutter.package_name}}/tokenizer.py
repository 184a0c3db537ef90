"""Text to tokens: the one tokenizer used for the training data and for raw text at prediction time."""

from __future__ import annotations

import html
import re
import unicodedata

# Recorded in cached IMDB preparations and in checkpoints: bump it whenever `tokenize` changes its output,
# so that ids made by an older tokenizer are never mixed with a newer vocabulary.
TOKENIZER_VERSION = "1"

# IMDB reviews keep the HTML line breaks of the web form ("<br /><br />"); they separate words.
_LINE_BREAK = re.compile(r"<br\s*/?\s*>", re.IGNORECASE)
# Typographic quotes carry no sentiment of their own: "don’t" and "don't" must be the same token.
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "`": "'", "\u201c": '"', "\u201d": '"'})
# A word is letters/digits with inner apostrophes ("don't", "90's"); every other visible character
# ("!", "?", "-", an emoji) is a token by itself, because punctuation carries sentiment ("!!!", ":(").
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Split a review into lower-case word and punctuation tokens.

    HTML entities are decoded (``&amp;`` -> ``&``), HTML line breaks become spaces, Unicode is normalized
    (NFKC: composed accents, full-width forms folded) and typographic quotes become ASCII ones.

    Args:
        text: one review or sentence.

    Returns:
        The tokens, possibly none (for an empty or blank text).

    Raises:
        ValueError: if ``text`` is not a string.

    Example:
        >>> tokenize("Loved it!<br /><br />Don’t miss it... 10/10")
        ['loved', 'it', '!', "don't", 'miss', 'it', '.', '.', '.', '10', '/', '10']
    """
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a string, got {type(text).__name__}")
    text = _LINE_BREAK.sub(" ", html.unescape(text))
    text = unicodedata.normalize("NFKC", text.lower()).translate(_QUOTES)
    return _TOKEN.findall(text)
