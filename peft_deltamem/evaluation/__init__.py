"""Evaluation tools for δ-mem: the recall ladder, scoring, the BM25 baseline and the LoCoMo loader.

Heavy dependencies (``nltk``, ``bm25s``) are imported lazily, on first use.
"""

from peft_deltamem.evaluation.ladder import (
    FACT_TYPES,
    LEVELS,
    answer_message,
    history_messages,
    make_ladder,
    question_messages,
    value_pool,
)
from peft_deltamem.evaluation.locomo import (
    CATEGORY_NAMES,
    LocomoFormatError,
    LocomoQA,
    LocomoSample,
    load_locomo,
    parse_locomo,
)
from peft_deltamem.evaluation.retrieval import bm25_top_k
from peft_deltamem.evaluation.scoring import (
    bootstrap_ci,
    contains_match,
    exact_match,
    forced_choice,
    locomo_f1,
    multi_answer_f1,
    normalize_answer,
    token_f1,
)

__all__ = [
    "CATEGORY_NAMES",
    "FACT_TYPES",
    "LEVELS",
    "LocomoFormatError",
    "LocomoQA",
    "LocomoSample",
    "answer_message",
    "bm25_top_k",
    "bootstrap_ci",
    "contains_match",
    "exact_match",
    "forced_choice",
    "history_messages",
    "load_locomo",
    "locomo_f1",
    "make_ladder",
    "multi_answer_f1",
    "normalize_answer",
    "parse_locomo",
    "question_messages",
    "token_f1",
    "value_pool",
]
