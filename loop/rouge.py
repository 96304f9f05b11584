"""ROUGE-1/2/L F1 for Korean text, on top of `rouge_score` with a Hangul-preserving tokenizer.

Tokens are kept exactly as produced (no lowercasing, no stemming) after NFC normalization of the input.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rouge_score import rouge_scorer

from loop.errors import UserError

TOKENIZERS = ("mecab", "whitespace", "char")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _nfc(text: str) -> str:
    # Decomposed (NFD) Hangul, e.g. text saved on macOS, is invisible to mecab and splits into jamo per char.
    return unicodedata.normalize("NFC", text)


class MecabTokenizer:
    """Korean morphemes from python-mecab-ko; the MeCab object is built on first use and reused."""

    def __init__(self) -> None:
        self._mecab: Any = None

    def tokenize(self, text: str) -> list[str]:
        """Split `text` into mecab morphemes."""
        if self._mecab is None:
            try:
                import mecab
            except ImportError as err:
                raise UserError(
                    "ROUGE tokenizer 'mecab' needs python-mecab-ko (pip install python-mecab-ko); "
                    "or use the 'whitespace' or 'char' tokenizer"
                ) from err
            self._mecab = mecab.MeCab()
        return self._mecab.morphs(_nfc(text))


class WhitespaceTokenizer:
    """Tokens are the whitespace-separated words (Korean eojeol)."""

    def tokenize(self, text: str) -> list[str]:
        """Split `text` on whitespace."""
        return _nfc(text).split()


class CharTokenizer:
    """Every non-space character (Hangul syllable, letter, digit, punctuation) is a token."""

    def tokenize(self, text: str) -> list[str]:
        """Split `text` into its non-space characters."""
        return [ch for ch in _nfc(text) if not ch.isspace()]


_INSTANCES = {"mecab": MecabTokenizer(), "whitespace": WhitespaceTokenizer(), "char": CharTokenizer()}


def get_tokenizer(name: str) -> MecabTokenizer | WhitespaceTokenizer | CharTokenizer:
    """Return the shared tokenizer object called `name` (usable as `RougeScorer(..., tokenizer=obj)`)."""
    try:
        return _INSTANCES[name]
    except KeyError:
        raise UserError(f"unknown ROUGE tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}") from None


@dataclass
class RougeResult:
    """Mean ROUGE F1 scores over samples, plus per-sample ROUGE-L F1."""

    rouge_1: float
    rouge_2: float
    rouge_l: float
    per_sample_rouge_l: list[float] = field(repr=False)
    tokenizer: str
    n: int

    def as_dict(self) -> dict[str, Any]:
        """Summary scores for logging (no per-sample list)."""
        return {
            "rouge_1": self.rouge_1,
            "rouge_2": self.rouge_2,
            "rouge_l": self.rouge_l,
            "tokenizer": self.tokenizer,
            "n": self.n,
        }


def compute_rouge(
    predictions: Sequence[str], references: Sequence[str], tokenizer: str = "mecab"
) -> RougeResult:
    """Score each prediction against its reference; return mean ROUGE-1/2/L F1 in [0, 1]."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), tokenizer=get_tokenizer(tokenizer))
    per_type: dict[str, list[float]] = {t: [] for t in _ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for rouge_type in _ROUGE_TYPES:
            per_type[rouge_type].append(scores[rouge_type].fmeasure)
    n = len(predictions)
    return RougeResult(
        rouge_1=math.fsum(per_type["rouge1"]) / n,
        rouge_2=math.fsum(per_type["rouge2"]) / n,
        rouge_l=math.fsum(per_type["rougeL"]) / n,
        per_sample_rouge_l=per_type["rougeL"],
        tokenizer=tokenizer,
        n=n,
    )
