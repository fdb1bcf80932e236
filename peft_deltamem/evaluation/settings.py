"""The systems of the memory-only protocol and :class:`EvalSettings`, how a task is evaluated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BASE_SYSTEMS: tuple[str, ...] = ("no_history", "full_history", "bm25")
MEMORY_SYSTEMS: tuple[str, ...] = ("deltamem", "deltamem_empty_memory", "deltamem_other_memory")
SYSTEMS: tuple[str, ...] = BASE_SYSTEMS + MEMORY_SYSTEMS

SYSTEM_LABELS: dict[str, str] = {
    "no_history": "base, no history",
    "full_history": "base, full history in prompt",
    "bm25": "base, BM25 top-k turns in prompt",
    "deltamem": "δ-mem, memory only",
    "deltamem_empty_memory": "δ-mem, empty memory (control)",
    "deltamem_other_memory": "δ-mem, other conversation's memory (control)",
}


@dataclass
class EvalSettings:
    """How a task is evaluated.

    Attributes:
        systems: which systems to run (memory systems need a δ-mem ``PeftModel``).
        batch_size: questions (or conversations, for the write pass) per model call.
        max_new_tokens: greedy-generation budget.
        max_context_tokens: prompt budget of ``full_history`` (None: the model's position limit minus
            ``max_new_tokens``); the oldest turns are dropped until the prompt fits.
        bm25_k: turns ``bm25`` puts into the prompt.
        generate: run greedy generation (exact / contains match, F1).
        forced_choice: score the answer set of closed questions (and the gold answer's log-probability).
        write_pass_reads: the write pass reads the memory while writing (False for adapters trained with a
            write-only write pass: evaluation must write the way training did).
        max_write_length: a session longer than this many tokens keeps its last tokens (as in training).
        other_seed: seed of the pairing of ``deltamem_other_memory`` (:func:`other_memory_pairing`).
        n_resamples, seed: bootstrap settings.
        chat_template_kwargs: extra chat-template arguments (e.g. ``{"enable_thinking": False}``).
        progress: show tqdm progress bars.
    """

    systems: tuple[str, ...] = SYSTEMS
    batch_size: int = 16
    max_new_tokens: int = 8
    max_context_tokens: int | None = None
    bm25_k: int = 2
    generate: bool = True
    forced_choice: bool = True
    write_pass_reads: bool = True
    max_write_length: int = 8192
    other_seed: int = 0
    n_resamples: int = 1000
    seed: int = 0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        self.systems = tuple(self.systems)
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
        if self.batch_size <= 0 or self.max_new_tokens < 0 or self.bm25_k < 0:
            raise ValueError("batch_size must be > 0, max_new_tokens and bm25_k >= 0")
        if not (self.generate or self.forced_choice):
            raise ValueError("enable at least one of generate / forced_choice")
