"""BM25 retrieval baseline: put the top-k history turns into the prompt instead of the whole history.

Built on the maintained ``bm25s`` package (Lucene BM25 variant), with English stop words and NLTK's Porter
stemmer on both the turns and the query. Each message is one retrievable turn; the selected turns are
returned in their original order, so the prompt still reads as a (shortened) conversation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Message = dict[str, Any]


@functools.lru_cache(maxsize=1)
def _stemmer() -> Callable[[list[str]], list[str]]:
    try:
        from nltk.stem import PorterStemmer
    except ImportError as exc:
        raise ImportError("The BM25 baseline stems with NLTK's Porter stemmer: `pip install nltk`") from exc
    porter = PorterStemmer()
    return lambda words: [porter.stem(word) for word in words]


def _bm25s() -> Any:
    try:
        import bm25s
    except ImportError as exc:
        raise ImportError("The BM25 baseline needs the bm25s package: `pip install bm25s`") from exc
    return bm25s


def _tokenize(texts: list[str]) -> list[list[str]]:
    bm25s = _bm25s()

    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), show_progress=False, return_ids=False)


def bm25_scores(texts: Sequence[str], query: str) -> np.ndarray:
    """BM25 score of every text for ``query`` (float array, one score per text; 0 when nothing matches)."""
    bm25s = _bm25s()
    if not texts:
        return np.zeros(0, dtype=np.float32)
    query_tokens = _tokenize([query])[0]
    if not query_tokens:
        return np.zeros(len(texts), dtype=np.float32)
    retriever = bm25s.BM25()
    retriever.index(_tokenize(list(texts)), show_progress=False)
    return np.asarray(retriever.get_scores(query_tokens), dtype=np.float32)


def bm25_top_k(history_messages: Sequence[Message], query: str, k: int) -> list[Message]:
    """Return the ``k`` history messages that best match ``query`` under BM25, in their original order.

    Args:
        history_messages: chat messages (``{"role", "content"}``); system messages are never retrieved.
        query: the question.
        k: how many turns to keep; ``k >= len(history)`` keeps every non-system turn.

    Ties (including turns that share no word with the query) are broken by recency: the later turn wins,
    so with few matches the prompt is padded with the most recent turns. The result is deterministic.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    candidates = [i for i, message in enumerate(history_messages) if message.get("role") != "system"]
    if k == 0 or not candidates:
        return []
    if k >= len(candidates):
        return [history_messages[i] for i in candidates]
    scores = bm25_scores([str(history_messages[i].get("content", "")) for i in candidates], query)
    order = sorted(range(len(candidates)), key=lambda j: (-float(scores[j]), -candidates[j]))
    keep = sorted(candidates[j] for j in order[:k])
    return [history_messages[i] for i in keep]


__all__ = ["bm25_scores", "bm25_top_k"]
