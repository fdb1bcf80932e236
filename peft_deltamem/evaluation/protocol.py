"""The memory-only evaluation protocol (docs/design.md §7): one task, six systems side by side.

A *task* is a list of conversations (each a list of sessions, each a list of chat messages) and a list of questions
about them. Every question is answered by six systems:

==========================  ====================================================================================
system                      what the model sees
==========================  ====================================================================================
``no_history``              base model (adapter disabled): system + question. The floor.
``full_history``            base model: system + as much of the history as fits + question. The ceiling.
``bm25``                    base model: system + the top-k history turns under BM25 + question. Retrieval.
``deltamem``                adapter: the history is written into a fresh memory (one call per session), then the
                            question is asked with **no history in the prompt**, reading that memory only.
``deltamem_empty_memory``   adapter, question only, all-zero memory. Control: the adapter without memory.
``deltamem_other_memory``   adapter, question only, the memory of another conversation, paired by a seeded random
                            cyclic permutation (no conversation reads its own memory; the pairing does not depend on
                            the answers). Control: a gain that this also shows is not memory.
==========================  ====================================================================================

The write pass is the training write pass (docs/design.md §5, :func:`~peft_deltamem.memory.write_pass.write_pass` on
:func:`~peft_deltamem.training.episodes.encode_write_history`):
system + session rendered with the chat template, token (or message/sentence) writes, reading the memory while
writing unless the adapter was trained with a write-only write pass (``EvalSettings.write_pass_reads=False``). The
question prompt is the training read context without the answer; it only reads the memory.

Metrics, per question: greedy generation (``exact_match`` after normalisation, the lenient ``contains_match`` beside
it, LoCoMo's token ``f1`` for LoCoMo), and, for closed answer sets, ``forced_choice``: the choice whose tokens (as the
chat template renders them in an assistant turn) have the highest summed log-probability after the question prompt. ``gold_logprob`` (the log-probability of the reference answer) is recorded for every
question: its gap between ``deltamem`` and ``deltamem_other_memory`` shows whether the adapter uses *its own* memory
even when the answers are still wrong. Means come with percentile-bootstrap 95 % intervals.

The pieces: :mod:`~peft_deltamem.evaluation.tasks` (what is asked), :mod:`~peft_deltamem.evaluation.settings` (the
systems, :class:`EvalSettings`), :mod:`~peft_deltamem.evaluation.prompts` (what each system sees),
:mod:`~peft_deltamem.evaluation.memories` (the write pass), :mod:`~peft_deltamem.evaluation.model_scoring` (the model's
answers and log-probabilities), :mod:`~peft_deltamem.evaluation.metrics` (text metrics) and
:mod:`~peft_deltamem.evaluation.summaries` (intervals, groups, diagnostics). This module runs them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .._padding import pad_token_id
from ._batching import base_context, batches, is_deltamem, progress
from .ladder import make_ladder
from .memories import memory_rows, needed_conversations, other_memory_pairing, write_memories
from .metrics import contains_match, exact_match, locomo_f1
from .model_scoring import answer_token_ids, greedy_generate, score_continuations
from .prompts import context_budget, prompt_messages
from .settings import BASE_SYSTEMS, MEMORY_SYSTEMS, EvalSettings
from .style import STYLE_LEVELS, STYLE_MIN_NEW_TOKENS
from .style_scoring import style_scores
from .summaries import diagnostics, primary_metric, summarize_records
from .tasks import MemoryTask, Question, locomo_task, recall_task

if TYPE_CHECKING:
    from ..memory.state import MemoryState


def score_answer(task: MemoryTask, question: Question, prediction: str) -> dict[str, Any]:
    """The scores of one generated answer: exact and contains match, plus LoCoMo's F1 or the style scores."""
    scores = {
        "exact_match": float(exact_match(prediction, question.answer)),
        "contains_match": float(contains_match(prediction, question.answer)),
    }
    if task.scoring == "locomo":
        scores["f1"] = float(locomo_f1(prediction, question.answer, int(question.category)))
    if task.scoring == "style":
        scores.update(style_scores(prediction, question.preferences or []))
    return scores


def run_system(
    system_name: str,
    model: Any,
    tokenizer: Any,
    task: MemoryTask,
    settings: EvalSettings,
    memories: MemoryState | None = None,
) -> list[dict[str, Any]]:
    """Answer every question of ``task`` with one system; returns one record per question.

    ``memories`` (one row per conversation, from :func:`write_memories`) is needed by the memory systems.
    """
    if system_name in MEMORY_SYSTEMS and memories is None:
        raise ValueError(f"system {system_name!r} needs the conversations' memories (write_memories)")
    n_conv = len(task.conversations)
    if system_name == "deltamem_other_memory" and n_conv < 2:
        raise ValueError("deltamem_other_memory needs at least two conversations")
    budget = context_budget(model, settings)
    pad = pad_token_id(tokenizer)
    pairing = other_memory_pairing(n_conv, settings.other_seed)
    template_cache: dict[tuple, list[int]] = {}
    records: list[dict[str, Any]] = []
    context = base_context(model) if system_name in BASE_SYSTEMS else contextlib.nullcontext()
    with context:
        for batch in progress(batches(len(task.questions), settings.batch_size), system_name, settings.progress):
            questions = [task.questions[i] for i in batch]
            built = [prompt_messages(system_name, task, q, settings, tokenizer, budget) for q in questions]
            prompts = [b[1] for b in built]
            memory = memory_rows(system_name, questions, memories, pairing)
            answers = (
                greedy_generate(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens, memory=memory)
                if settings.generate
                else [None] * len(questions)
            )
            choice_scores = None
            if settings.forced_choice:
                options = [q.choices or [q.answer] for q in questions]
                conts = [
                    [answer_token_ids(tokenizer, b[0], o, settings.chat_template_kwargs, template_cache) for o in opts]
                    for b, opts in zip(built, options, strict=True)
                ]
                choice_scores = score_continuations(model, prompts, conts, pad_id=pad, memory=memory)
            for k, q in enumerate(questions):
                record: dict[str, Any] = {
                    "id": q.id,
                    "group": q.group,
                    "answer": q.answer,
                    "prompt_tokens": len(prompts[k]),
                    "history_turns_in_prompt": built[k][2],
                }
                if system_name == "deltamem_other_memory":
                    record["memory_of"] = task.conversations[pairing[q.conversation]].id
                if answers[k] is not None:
                    record["prediction"] = answers[k]
                    record.update(score_answer(task, q, answers[k]))
                if choice_scores is not None:
                    add_choice_scores(record, q, choice_scores[k])
                records.append(record)
    return records


def add_choice_scores(record: dict[str, Any], question: Question, scores: Sequence[float]) -> None:
    if question.choices:
        best = int(np.argmax(scores))  # first choice wins a tie, as in scoring.forced_choice
        record["choice"] = question.choices[best]
        record["forced_choice"] = float(question.choices[best] == question.answer)
        gold = question.choices.index(question.answer) if question.answer in question.choices else None
        record["gold_logprob"] = float(scores[gold]) if gold is not None else None
        record["choice_logprobs"] = [round(float(s), 4) for s in scores]
    else:
        record["gold_logprob"] = float(scores[0])


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: MemoryTask,
    settings: EvalSettings | None = None,
    *,
    on_system_done: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every system of ``settings.systems`` on ``task`` and summarise.

    Only the conversations the questions need are written into memory (:func:`needed_conversations`: their own, and
    the ones the other-memory control pairs them with), so a few questions of a long benchmark stay cheap.

    Returns a JSON-serialisable dict: ``task``, ``metric``, ``n_questions``, ``n_conversations``,
    ``n_conversations_written``, ``systems``
    (name -> summary, see :func:`summarize_records`), ``diagnostics`` (own-vs-other memory gap, chance level),
    ``seconds`` per system, ``settings``, and ``records`` (per question, per system).
    """
    settings = settings or EvalSettings()
    systems = list(settings.systems)
    if any(s in MEMORY_SYSTEMS for s in systems) and not is_deltamem(model):
        raise ValueError("the deltamem systems need a δ-mem PeftModel; pass systems=BASE_SYSTEMS for a plain model")
    if "deltamem_other_memory" in systems and len(task.conversations) < 2:
        systems.remove("deltamem_other_memory")
    was_training = getattr(model, "training", False)
    model.eval()
    metric = primary_metric(task, settings)
    seconds: dict[str, float] = {}
    memories, written = None, []
    try:
        if any(s in MEMORY_SYSTEMS for s in systems):
            start = time.perf_counter()
            # Only the memories the questions read: a few questions of a long benchmark need a few conversations.
            written = needed_conversations(task, systems, settings.other_seed)
            memories = write_memories(model, tokenizer, task, settings, conversations=written)
            seconds["write_memories"] = time.perf_counter() - start
        per_system: dict[str, list[dict]] = {}
        summaries: dict[str, dict] = {}
        for name in systems:
            start = time.perf_counter()
            per_system[name] = run_system(name, model, tokenizer, task, settings, memories)
            seconds[name] = time.perf_counter() - start
            summaries[name] = summarize_records(per_system[name], metric, settings)
            if on_system_done is not None:
                on_system_done(name, summaries[name])
    finally:
        if was_training:
            model.train()
    settings_dict = asdict(settings)
    settings_dict["systems"] = list(settings.systems)
    return {
        "task": task.name,
        "metric": metric,
        "n_questions": len(task.questions),
        "n_conversations": len(task.conversations),
        "n_conversations_written": len(written) if memories is not None else 0,
        "systems": summaries,
        "diagnostics": diagnostics(per_system, task, settings),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "settings": settings_dict,
        "records": per_system,
    }


def evaluate_recall(
    model: Any,
    tokenizer: Any,
    level: int,
    n: int = 200,
    *,
    seed: int = 0,
    split: str = "test",
    fact_types: Sequence[str] | None = None,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    """Evaluate the recall ladder's ``level`` (``n`` conversations of ``split``) with the memory-only protocol.

    The working-style levels (6-7) are scored on greedy answers of at least :data:`STYLE_MIN_NEW_TOKENS` new tokens
    (``settings.max_new_tokens`` is raised to that if lower: a word limit cannot be judged on a cut answer).
    """
    settings = settings or EvalSettings()
    if level in STYLE_LEVELS:
        if not settings.generate:
            raise ValueError(f"level {level} (working style) scores generated answers: set EvalSettings.generate=True")
        settings = replace(settings, max_new_tokens=max(settings.max_new_tokens, STYLE_MIN_NEW_TOKENS))
    examples = make_ladder(level, n, seed=seed, split=split, fact_types=fact_types)
    result = evaluate_task(model, tokenizer, recall_task(examples, name=f"recall-L{level}"), settings)
    result.update(
        {"benchmark": "recall", "level": level, "split": split, "seed": seed, "fact_types": list(fact_types or [])}
    )
    return result


def evaluate_locomo(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Any],
    *,
    settings: EvalSettings | None = None,
    max_questions: int | None = None,
) -> dict[str, Any]:
    """Evaluate LoCoMo-format samples: token F1 per category 1-4 (greedy answers), with the six systems."""
    # forced_choice here only scores the gold answer (LoCoMo has no answer sets): the own-vs-other memory gap.
    settings = settings or EvalSettings(max_new_tokens=32, bm25_k=10)
    task = locomo_task(samples)
    if max_questions is not None:
        task.questions = task.questions[:max_questions]
    result = evaluate_task(model, tokenizer, task, settings)
    result["benchmark"] = "locomo"
    return result
