"""Minimum-Bayes-risk choice among several models' summaries of one dialogue: the one the others agree with most.

Agreement of two candidates is their ROUGE score from loop.rouge: the mean of ROUGE-1, ROUGE-2 and ROUGE-L F1
(`rouge_mean`, the leaderboard's number) with the run's ROUGE tokenizer. ROUGE F1 is symmetric, so each pair is
scored once. Identical candidates agree fully (1.0), even when empty; an empty candidate agrees with no other (0.0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from loop.rouge import compute_rouge

RULE = ("each row gets the candidate with the highest mean ROUGE against the other models' candidates "
        "(ROUGE = mean of ROUGE-1/2/L F1, tokenizer {tokenizer}; identical candidates score 1.0; "
        "ties go to the earliest --model)")


def agreement(a: str, b: str, tokenizer: str) -> float:
    """How much two candidates agree: 1.0 when identical, else the mean of their ROUGE-1/2/L F1."""
    if a == b:
        return 1.0
    if not a.strip() or not b.strip():
        return 0.0
    return compute_rouge([a], [b], tokenizer=tokenizer).rouge_mean


def choose(candidates: Sequence[str], tokenizer: str = "mecab") -> tuple[int, list[float]]:
    """The index of the candidate with the highest mean agreement with the others (first on ties), and each score.

    A lone candidate is chosen with score 1.0 (nothing disagrees with it) and no ROUGE is computed.
    """
    if isinstance(candidates, str) or not candidates:
        raise ValueError("choose() needs a non-empty sequence of candidate strings")
    k = len(candidates)
    if k == 1:
        return 0, [1.0]
    pair: dict[tuple[int, int], float] = {}
    for i in range(k):
        for j in range(i + 1, k):
            pair[i, j] = pair[j, i] = agreement(candidates[i], candidates[j], tokenizer)
    scores = [math.fsum(pair[i, j] for j in range(k) if j != i) / (k - 1) for i in range(k)]
    best = max(scores)
    return scores.index(best), scores
