"""ROUGE-1/2/L F1 for Korean text, on top of `rouge_score` with a Hangul-preserving tokenizer.

Tokens are kept exactly as produced (no lowercasing, no stemming) after NFC normalization of the input. A sample
may have several references: each ROUGE type's F1 is combined over them by mean or max, then averaged over samples.
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
# How one sample's F1 against several references becomes one number, per ROUGE type.
AGGREGATES = ("mean", "max")
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
    """Mean ROUGE F1 scores over samples (each sample's F1 combined over its references), plus per-sample ROUGE-L."""

    rouge_1: float
    rouge_2: float
    rouge_l: float
    per_sample_rouge_l: list[float] = field(repr=False)
    tokenizer: str
    n: int
    rouge_mean: float = 0.0  # (rouge_1 + rouge_2 + rouge_l) / 3, what the competition leaderboard shows (x100)
    aggregate: str = "mean"
    references: int = 1  # the most references any sample had

    def as_dict(self) -> dict[str, Any]:
        """Summary scores for logging (no per-sample list)."""
        return {
            "rouge_1": self.rouge_1,
            "rouge_2": self.rouge_2,
            "rouge_l": self.rouge_l,
            "rouge_mean": self.rouge_mean,
            "tokenizer": self.tokenizer,
            "aggregate": self.aggregate,
            "references": self.references,
            "n": self.n,
        }


def _reference_list(reference: str | Sequence[str], row: int) -> list[str]:
    """One sample's references with the empty ones left out; a sample with none is a ValueError."""
    texts = [reference] if isinstance(reference, str) else list(reference)
    if not all(isinstance(text, str) for text in texts):
        raise TypeError(f"sample {row}: references must be strings, got {texts!r}")
    # An empty reference is missing data, not a summary: scoring against it would pull the sample towards 0.
    kept = [text for text in texts if text.strip()]
    if not kept:
        raise ValueError(f"sample {row}: every reference is empty")
    return kept


def compute_rouge(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    tokenizer: str = "mecab",
    aggregate: str = "mean",
) -> RougeResult:
    """Score each prediction against its reference(s); return mean ROUGE-1/2/L F1 in [0, 1].

    A reference is a string or a list of strings (several references). Per sample, each ROUGE type's F1 is
    combined over the non-empty references by `aggregate` (mean or max); the result is the mean over samples.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    if aggregate not in AGGREGATES:
        raise UserError(f"unknown ROUGE aggregate {aggregate!r}; choose one of: {', '.join(AGGREGATES)}")
    combine = max if aggregate == "max" else _mean
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), tokenizer=get_tokenizer(tokenizer))
    per_type: dict[str, list[float]] = {t: [] for t in _ROUGE_TYPES}
    most = 0
    for row, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        texts = _reference_list(reference, row)
        most = max(most, 1 if isinstance(reference, str) else len(reference))
        scores = [scorer.score(text, prediction) for text in texts]
        for rouge_type in _ROUGE_TYPES:
            per_type[rouge_type].append(combine([s[rouge_type].fmeasure for s in scores]))
    n = len(predictions)
    rouge_1, rouge_2, rouge_l = (math.fsum(per_type[t]) / n for t in _ROUGE_TYPES)
    return RougeResult(
        rouge_1=rouge_1,
        rouge_2=rouge_2,
        rouge_l=rouge_l,
        per_sample_rouge_l=per_type["rougeL"],
        tokenizer=tokenizer,
        n=n,
        rouge_mean=math.fsum((rouge_1, rouge_2, rouge_l)) / 3,
        aggregate=aggregate,
        references=max(most, 1),
    )


def _mean(values: list[float]) -> float:
    """The mean, summed exactly: one reference gives back its own F1 unchanged."""
    return math.fsum(values) / len(values)
