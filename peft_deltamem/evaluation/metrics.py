"""Scoring: exact match, LoCoMo's token F1 (Porter-stemmed), forced choice and bootstrap intervals.

The F1 follows the LoCoMo benchmark's published evaluation (Maharana et al., 2024): answers are normalised
(lower case, commas and other punctuation dropped, the words "a", "an", "the" and "and" removed, whitespace
collapsed), split into words, Porter-stemmed (NLTK's ``PorterStemmer``), and compared as bags of tokens.
Category 1 (multi-hop) answers list several items separated by commas: each ground-truth item is scored
against its best-matching prediction item and the scores are averaged. Category 3 ground truths keep only
the part before the first ";". Categories 2 and 4 use the plain token F1.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_PUNCTUATION = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—"}


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the words a/an/the/and, and collapse whitespace."""
    text = str(text).lower().replace(",", "")
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """True when prediction and answer are equal after :func:`normalize_answer` ("Teal." == "teal")."""
    return normalize_answer(prediction) == normalize_answer(answer)


def contains_match(prediction: str, answer: str) -> bool:
    """Lenient match: the normalised answer occurs as whole words in the normalised prediction.

    ("The answer is teal." contains "teal"). Reported beside :func:`exact_match`, never instead of it.
    """
    norm_answer = normalize_answer(answer)
    if not norm_answer:
        return False
    return f" {norm_answer} " in f" {normalize_answer(prediction)} "


@functools.lru_cache(maxsize=1)
def _porter() -> Callable[[str], str]:
    try:
        from nltk.stem import PorterStemmer
    except ImportError as exc:
        raise ImportError("LoCoMo's F1 uses NLTK's Porter stemmer: `pip install nltk`") from exc
    return PorterStemmer().stem


def _stemmed_tokens(text: str) -> list[str]:
    stem = _porter()
    return [stem(word) for word in normalize_answer(text).split()]


def token_f1(prediction: str, ground_truth: str) -> float:
    """LoCoMo token F1 between two strings: normalised, Porter-stemmed bags of words (0.0 if either is empty)."""
    pred_tokens = _stemmed_tokens(prediction)
    truth_tokens = _stemmed_tokens(ground_truth)
    common = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def multi_answer_f1(prediction: str, ground_truth: str) -> float:
    """LoCoMo category-1 F1: split both on commas; mean over ground-truth items of the best item F1."""
    predictions = [part.strip() for part in str(prediction).split(",")]
    truths = [part.strip() for part in str(ground_truth).split(",")]
    return float(np.mean([max(token_f1(pred, truth) for pred in predictions) for truth in truths]))


def locomo_f1(prediction: str, answer: str, category: int) -> float:
    """Score one LoCoMo QA item (categories 1-4) the way LoCoMo's evaluation does."""
    if category == 1:
        return multi_answer_f1(prediction, answer)
    if category == 3:
        answer = str(answer).split(";")[0].strip()
    if category in (2, 3, 4):
        return token_f1(prediction, answer)
    raise ValueError(f"LoCoMo category must be 1-4 (5, adversarial, is not scored by F1), got {category!r}")


def forced_choice(logprob_by_choice: Mapping[str, float]) -> str:
    """The choice with the highest log-probability (first one listed wins a tie)."""
    if not logprob_by_choice:
        raise ValueError("forced_choice needs at least one choice")
    best, best_score = None, -float("inf")
    for choice, score in logprob_by_choice.items():
        if best is None or float(score) > best_score:
            best, best_score = choice, float(score)
    return best


def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of the mean: returns ``(mean, lo, hi)`` with ``lo <= mean <= hi``.

    Deterministic for a given ``seed``. ``values`` are per-example scores (e.g. 0/1 accuracies or F1s).
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    mean = float(data.mean())
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, min(float(lo), mean), max(float(hi), mean)


__all__ = [
    "bootstrap_ci",
    "contains_match",
    "exact_match",
    "forced_choice",
    "locomo_f1",
    "multi_answer_f1",
    "normalize_answer",
    "token_f1",
]
