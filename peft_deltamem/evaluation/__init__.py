"""Evaluating δ-mem: the memory-only protocol, the recall ladder, LoCoMo, text metrics and the BM25 baseline.

The protocol (:mod:`~peft_deltamem.evaluation.protocol`) runs on a task (:mod:`~peft_deltamem.evaluation.tasks`) with
:class:`EvalSettings`; a new benchmark is a loader that returns a :class:`MemoryTask`. Heavy dependencies (``nltk``,
``bm25s``) are imported lazily, on first use.
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
from peft_deltamem.evaluation.memories import other_memory_pairing, write_memories
from peft_deltamem.evaluation.metrics import (
    bootstrap_ci,
    contains_match,
    exact_match,
    forced_choice,
    locomo_f1,
    multi_answer_f1,
    normalize_answer,
    token_f1,
)
from peft_deltamem.evaluation.protocol import evaluate_locomo, evaluate_recall, evaluate_task, run_system
from peft_deltamem.evaluation.retrieval import bm25_top_k
from peft_deltamem.evaluation.settings import BASE_SYSTEMS, MEMORY_SYSTEMS, SYSTEM_LABELS, SYSTEMS, EvalSettings
from peft_deltamem.evaluation.summaries import primary_metric, summarize_records
from peft_deltamem.evaluation.tasks import Conversation, MemoryTask, Question, locomo_task, recall_task

__all__ = [
    "BASE_SYSTEMS",
    "CATEGORY_NAMES",
    "Conversation",
    "EvalSettings",
    "MEMORY_SYSTEMS",
    "MemoryTask",
    "Question",
    "SYSTEMS",
    "SYSTEM_LABELS",
    "evaluate_locomo",
    "evaluate_recall",
    "evaluate_task",
    "locomo_task",
    "other_memory_pairing",
    "primary_metric",
    "recall_task",
    "run_system",
    "summarize_records",
    "write_memories",
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
