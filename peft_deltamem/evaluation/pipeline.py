"""Deprecated: the protocol is split into :mod:`~peft_deltamem.evaluation.protocol` and the modules it names; import
from ``peft_deltamem.evaluation`` (this path goes away in the next release)."""

import warnings

from .memories import other_memory_pairing, write_memories
from .model_scoring import answer_token_ids, greedy_generate, score_continuations
from .prompts import render_prompt
from .protocol import evaluate_locomo, evaluate_recall, evaluate_task, run_system
from .settings import BASE_SYSTEMS, MEMORY_SYSTEMS, SYSTEM_LABELS, SYSTEMS, EvalSettings
from .summaries import primary_metric, summarize_records
from .tasks import Conversation, MemoryTask, Question, locomo_task, recall_task

__all__ = [
    "BASE_SYSTEMS",
    "MEMORY_SYSTEMS",
    "SYSTEMS",
    "SYSTEM_LABELS",
    "Conversation",
    "EvalSettings",
    "MemoryTask",
    "Question",
    "answer_token_ids",
    "evaluate_locomo",
    "evaluate_recall",
    "evaluate_task",
    "greedy_generate",
    "locomo_task",
    "other_memory_pairing",
    "primary_metric",
    "recall_task",
    "render_prompt",
    "run_system",
    "score_continuations",
    "summarize_records",
    "write_memories",
]

warnings.warn(
    "peft_deltamem.evaluation.pipeline is split into peft_deltamem.evaluation.protocol and the modules it names; "
    "import from peft_deltamem.evaluation. The old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
