"""The memory-only evaluation protocol (DESIGN.md §7): one task, six systems side by side.

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

The write pass is the training write pass (DESIGN.md §5, :func:`~peft_deltamem.training.episodes.encode_write_history`):
system + session rendered with the chat template, token (or message/sentence) writes, reading the memory while
writing unless the adapter was trained with a write-only write pass (``EvalSettings.write_pass_reads=False``). The
question prompt is the training read context without the answer; it only reads the memory.

Metrics, per question: greedy generation (``exact_match`` after normalisation, the lenient ``contains_match`` beside
it, LoCoMo's token ``f1`` for LoCoMo), and, for closed answer sets, ``forced_choice``: the choice whose tokens (as the
chat template renders them in an assistant turn) have the highest summed log-probability after the question prompt. ``gold_logprob`` (the log-probability of the reference answer) is recorded for every
question: its gap between ``deltamem`` and ``deltamem_other_memory`` shows whether the adapter uses *its own* memory
even when the answers are still wrong. Means come with percentile-bootstrap 95 % intervals.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .._compat import cache_kwargs, output_cache
from ..memory.state import MemoryState
from .ladder import history_messages
from .retrieval import bm25_top_k
from .scoring import bootstrap_ci, contains_match, exact_match, locomo_f1

Message = dict[str, str]

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


# ------------------------------------------------------------------------------------------------------------- task


@dataclass
class Conversation:
    """One conversation: its sessions (each written into memory by one model call) and an optional system message."""

    id: str
    sessions: list[list[Message]]
    system: str | None = None

    def history(self) -> list[Message]:
        """All sessions as one message list (what the in-prompt baselines see)."""
        return [m for session in self.sessions for m in session]


@dataclass
class Question:
    """One question about conversation ``conversation`` (an index into the task's conversations)."""

    id: str
    conversation: int
    question: str
    answer: str
    choices: list[str] | None = None
    group: str = "all"
    category: int | None = None


@dataclass
class MemoryTask:
    """Conversations and questions, plus how answers are scored (``"exact"`` or ``"locomo"``)."""

    name: str
    conversations: list[Conversation]
    questions: list[Question]
    scoring: str = "exact"

    def __post_init__(self) -> None:
        if self.scoring not in ("exact", "locomo"):
            raise ValueError(f"scoring must be 'exact' or 'locomo', got {self.scoring!r}")
        for q in self.questions:
            if not 0 <= q.conversation < len(self.conversations):
                raise ValueError(f"question {q.id} refers to conversation {q.conversation}, which does not exist")


def recall_task(examples: Sequence[Mapping[str, Any]], name: str = "recall") -> MemoryTask:
    """A task from recall-ladder records (:func:`~peft_deltamem.evaluation.ladder.make_ladder`): one conversation
    (one session) and one question per record."""
    conversations, questions = [], []
    for i, ex in enumerate(examples):
        first = ex["messages"][0]
        system = first["content"] if first["role"] == "system" else None
        conversations.append(Conversation(id=str(ex["id"]), sessions=[history_messages(ex)], system=system))
        questions.append(
            Question(
                id=str(ex["id"]),
                conversation=i,
                question=ex["messages"][-2]["content"],
                answer=str(ex["answer"]),
                choices=list(ex["choices"]) if ex.get("choices") else None,
                group=str(ex.get("fact_type", "all")),
            )
        )
    return MemoryTask(name=name, conversations=conversations, questions=questions, scoring="exact")


def locomo_task(samples: Sequence[Any], name: str = "locomo", *, roles: str = "alternate") -> MemoryTask:
    """A task from :func:`~peft_deltamem.evaluation.locomo.load_locomo` samples: one memory per conversation, written
    one session per call; every scored QA item (categories 1-4) is a question, grouped by category."""
    from .locomo import CATEGORY_NAMES

    conversations, questions = [], []
    for c, sample in enumerate(samples):
        conversations.append(Conversation(id=sample.sample_id, sessions=sample.session_messages(roles=roles)))
        for j, qa in enumerate(sample.qa):
            questions.append(
                Question(
                    id=f"{sample.sample_id}/qa{j}",
                    conversation=c,
                    question=qa.question,
                    answer=qa.answer,
                    group=f"{qa.category}-{CATEGORY_NAMES.get(qa.category, '?')}",
                    category=qa.category,
                )
            )
    return MemoryTask(name=name, conversations=conversations, questions=questions, scoring="locomo")


# --------------------------------------------------------------------------------------------------------- settings


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


# -------------------------------------------------------------------------------------------------------- helpers


def _progress(items: Sequence[Any], desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, leave=False, dynamic_ncols=True))


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _is_deltamem(model: Any) -> bool:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        return False
    from .._registry import DELTAMEM_PEFT_TYPE

    config = configs.get(getattr(model, "active_adapter", None))
    return getattr(config, "peft_type", None) == DELTAMEM_PEFT_TYPE


def _adapter_config(model: Any) -> Any:
    return model.peft_config[model.active_adapter]


def _base_context(model: Any) -> contextlib.AbstractContextManager:
    """Run the base model: disable the adapter of a PeftModel (exact base outputs); a plain model is the base."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) and _is_deltamem(model) else contextlib.nullcontext()


def render_prompt(tokenizer: Any, messages: Sequence[Message], template_kwargs: Mapping[str, Any]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and its generation prompt (as training renders)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True, **template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system is not None else []


def _fit_history(
    tokenizer: Any,
    system: str | None,
    history: Sequence[Message],
    question: Message,
    budget: int,
    template_kwargs: Mapping[str, Any],
) -> tuple[list[int], int]:
    """The longest suffix of ``history`` whose prompt fits in ``budget`` tokens: (prompt ids, turns kept).

    Binary search over the first kept turn (prompt length only grows with more turns), so long conversations cost
    O(log n) renderings instead of n.
    """

    def ids(start: int) -> list[int]:
        return render_prompt(tokenizer, [*_prefix(system), *history[start:], question], template_kwargs)

    full = ids(0)
    if len(full) <= budget:
        return full, len(history)
    lo, hi = 1, len(history)  # hi: no history at all always "fits" (or is the best we can do)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(ids(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return ids(lo), len(history) - lo


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _zero_memory(memory: MemoryState) -> MemoryState:
    """A memory of the same layout and rows with every state zero (what a fresh memory reads)."""
    return memory.detach().zeros_like()


# ----------------------------------------------------------------------------------------------------- write pass


def _session_ids(
    tokenizer: Any, system: str | None, session: Sequence[Message], settings: EvalSettings, granularity: str
):
    from ..training.episodes import EpisodeOptions, encode_write_history

    options = EpisodeOptions(
        max_write_length=settings.max_write_length,
        write_granularity=granularity,
        chat_template_kwargs=settings.chat_template_kwargs,
    )
    return encode_write_history(tokenizer, [*_prefix(system), *session], options)


@torch.no_grad()
def write_memories(model: Any, tokenizer: Any, task: MemoryTask, settings: EvalSettings) -> MemoryState:
    """Write every conversation's sessions into its own fresh memory; returns one memory row per conversation.

    Sessions are written in order, one model call per session (positions restart at 0, no KV cache between
    sessions), batching the same session index across conversations. Right padding: padded tokens are never written.
    """
    granularity = _adapter_config(model).write_granularity
    device, pad = _device(model), _pad_id(tokenizer)
    memories: list[MemoryState | None] = [None] * len(task.conversations)
    max_sessions = max((len(c.sessions) for c in task.conversations), default=0)
    jobs = []
    for s in range(max_sessions):
        rows = [c for c, conv in enumerate(task.conversations) if len(conv.sessions) > s and conv.sessions[s]]
        jobs += [(s, [rows[i] for i in batch]) for batch in _batches(len(rows), settings.batch_size)]
    for s, rows in _progress(jobs, "write memories", settings.progress):
        encoded = [
            _session_ids(
                tokenizer, task.conversations[c].system, task.conversations[c].sessions[s], settings, granularity
            )
            for c in rows
        ]
        ids, mask = _right_pad([e[0] for e in encoded], pad, device)
        kwargs: dict[str, Any] = {}
        if granularity != "token":
            segments, _ = _right_pad([e[1] for e in encoded], -1, device)
            kwargs["memory_segment_ids"] = segments.masked_fill(mask == 0, -1)
        fresh = all(memories[c] is None for c in rows)
        if not fresh:  # a conversation whose earlier sessions were empty starts from a zero memory
            template = next(m for m in memories if m is not None)
            for c in rows:
                memories[c] = memories[c] if memories[c] is not None else _empty_like(template)
        memory = MemoryState() if fresh else MemoryState.cat([memories[c] for c in rows])
        model(
            input_ids=ids,
            attention_mask=mask,
            memory=memory,
            memory_read=settings.write_pass_reads,
            use_cache=False,
            logits_to_keep=1,  # the write pass needs no logits; skip the large vocabulary projection
            **kwargs,
        )
        for i, c in enumerate(rows):
            memories[c] = memory[i]
    if any(m is None for m in memories):  # conversations with no history at all read an empty memory
        template = next((m for m in memories if m is not None), None)
        if template is None:
            raise ValueError("no conversation has any history to write into memory")
        memories = [m if m is not None else _empty_like(template) for m in memories]
    return MemoryState.cat(memories)


def _empty_like(memory: MemoryState) -> MemoryState:
    return _zero_memory(memory[0])


# ------------------------------------------------------------------------------------------------------- scoring


def answer_token_ids(
    tokenizer: Any,
    prompt_messages: Sequence[Message],
    answer: str,
    template_kwargs: Mapping[str, Any],
    cache: dict[tuple, list[int]] | None = None,
) -> list[int]:
    """The tokens of ``answer`` as the chat template renders it in an assistant turn after ``prompt_messages``.

    These are the training labels (everything after the generation prompt) up to the token that holds the answer's
    last character: the end-of-turn tokens are left out, as usual for forced choice (they are the same for every
    choice, and leaving them out lets single-token choices be scored from the prompt's last logits alone).
    """
    key = (tuple((m["role"], m["content"]) for m in prompt_messages), answer)
    if cache is not None and key in cache:
        return cache[key]
    prompt_ids = render_prompt(tokenizer, prompt_messages, template_kwargs)
    full_text = tokenizer.apply_chat_template(
        [*prompt_messages, {"role": "assistant", "content": answer}], tokenize=False, **template_kwargs
    )
    encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    start = 0
    while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
        start += 1
    at = full_text.rfind(answer) if answer else -1
    end = at + len(answer) if at >= 0 else len(full_text)
    tokens = [t for t, (lo, _) in zip(ids[start:], offsets[start:], strict=True) if lo < end]
    tokens = tokens or ids[start : start + 1]
    if cache is not None:
        cache[key] = tokens
    return tokens


@torch.no_grad()
def score_continuations(
    model: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    memory: MemoryState | None = None,
) -> list[list[float]]:
    """Summed log-probability of each continuation after its prompt: ``out[i][j] = log p(continuations[i][j] | prompts[i])``.

    The prompts run once (left-padded, KV cache kept, last logits only), which scores every first token; only the
    continuations longer than one token run again, on copies of their prompt's cache rows. ``memory`` (one row per
    prompt) is only read. Without ``memory`` the model must not write either (a plain model, or a δ-mem model inside
    ``disable_adapter()``): a δ-mem forward without ``memory=`` writes into a temporary memory that the cached
    continuation would not see.
    """
    device = _device(model)
    ids, mask = _left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    mem_kwargs: dict[str, Any] = {"memory": memory, "memory_write": False} if memory is not None else {}
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **mem_kwargs
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = [[float(first[i, c[0]]) for c in conts] for i, conts in enumerate(continuations)]
    longer = [(i, j) for i, conts in enumerate(continuations) for j, c in enumerate(conts) if len(c) > 1]
    if not longer:
        return scores
    row_index = torch.tensor([i for i, _ in longer], dtype=torch.long, device=device)
    cache = output_cache(out)
    cache.batch_select_indices(row_index)
    # Feed all but the last token: position t predicts token t + 1.
    cont_ids, cont_mask = _right_pad([continuations[i][j][:-1] for i, j in longer], pad_id, device)
    cont_positions = mask.sum(-1)[row_index].unsqueeze(1) + torch.arange(cont_ids.shape[1], device=device)
    if memory is not None:
        mem_kwargs["memory"] = memory[row_index]
    logprobs = torch.log_softmax(
        model(
            input_ids=cont_ids,
            attention_mask=torch.cat([mask[row_index], cont_mask], dim=1),
            position_ids=cont_positions,
            use_cache=True,
            **cache_kwargs(model, cache),
            **mem_kwargs,
        ).logits.float(),
        dim=-1,
    )
    for k, (i, j) in enumerate(longer):
        tokens = continuations[i][j]
        scores[i][j] += sum(float(logprobs[k, t - 1, tokens[t]]) for t in range(1, len(tokens)))
    return scores


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    memory: MemoryState | None = None,
) -> list[str]:
    """Greedy answers (special tokens dropped, whitespace stripped) to left-padded prompts; ``memory`` is only read."""
    from transformers import GenerationConfig

    device, pad = _device(model), _pad_id(tokenizer)
    ids, mask = _left_pad(prompts, pad, device)
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos or None
    )
    kwargs: dict[str, Any] = {"memory": memory, "memory_write": False} if memory is not None else {}
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **kwargs)
    sequences = out if torch.is_tensor(out) else out.sequences
    return [t.strip() for t in tokenizer.batch_decode(sequences[:, ids.shape[1] :], skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------------------- protocol


def _prompt_messages(
    system_name: str, task: MemoryTask, question: Question, settings: EvalSettings, tokenizer: Any, budget: int
) -> tuple[list[Message], list[int], int]:
    """(prompt messages, prompt ids, history turns in the prompt) of one question for one system."""
    conv = task.conversations[question.conversation]
    ask = {"role": "user", "content": question.question}
    kwargs = settings.chat_template_kwargs
    if system_name == "full_history":
        history = conv.history()
        ids, kept = _fit_history(tokenizer, conv.system, history, ask, budget, kwargs)
        return [*_prefix(conv.system), *history[len(history) - kept :], ask], ids, kept
    if system_name == "bm25":
        turns = bm25_top_k(conv.history(), question.question, settings.bm25_k)
        messages = [*_prefix(conv.system), *turns, ask]
        return messages, render_prompt(tokenizer, messages, kwargs), len(turns)
    messages = [*_prefix(conv.system), ask]
    return messages, render_prompt(tokenizer, messages, kwargs), 0


def _context_budget(model: Any, settings: EvalSettings) -> int:
    if settings.max_context_tokens is not None:
        return settings.max_context_tokens
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    return int(limit) - settings.max_new_tokens


def _score_answer(task: MemoryTask, question: Question, prediction: str) -> dict[str, Any]:
    scores = {
        "exact_match": float(exact_match(prediction, question.answer)),
        "contains_match": float(contains_match(prediction, question.answer)),
    }
    if task.scoring == "locomo":
        scores["f1"] = float(locomo_f1(prediction, question.answer, int(question.category)))
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
    budget = _context_budget(model, settings)
    pad = _pad_id(tokenizer)
    pairing = other_memory_pairing(n_conv, settings.other_seed)
    template_cache: dict[tuple, list[int]] = {}
    records: list[dict[str, Any]] = []
    context = _base_context(model) if system_name in BASE_SYSTEMS else contextlib.nullcontext()
    with context:
        for batch in _progress(_batches(len(task.questions), settings.batch_size), system_name, settings.progress):
            questions = [task.questions[i] for i in batch]
            built = [_prompt_messages(system_name, task, q, settings, tokenizer, budget) for q in questions]
            prompts = [b[1] for b in built]
            memory = _memory_rows(system_name, questions, memories, pairing)
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
                    record.update(_score_answer(task, q, answers[k]))
                if choice_scores is not None:
                    _add_choice_scores(record, q, choice_scores[k])
                records.append(record)
    return records


def other_memory_pairing(n: int, seed: int = 0) -> list[int]:
    """``pairing[c]``: whose memory conversation ``c`` reads in ``deltamem_other_memory``.

    A uniformly random cyclic permutation (Sattolo's algorithm), so no conversation gets its own memory, and,
    unlike a fixed shift, the pairing is independent of how the benchmark orders its answers (the ladder balances
    answers in blocks, so neighbours never share one: a shift by one would make a perfect memory score 0 on this
    control instead of chance).
    """
    import random

    order = list(range(n))
    rng = random.Random(f"other-memory/{seed}")
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: every element moves, the result is one cycle
        order[i], order[j] = order[j], order[i]
    return order


def _memory_rows(
    system_name: str, questions: Sequence[Question], memories: MemoryState | None, pairing: Sequence[int]
) -> MemoryState | None:
    if system_name in BASE_SYSTEMS:
        return None
    if system_name == "deltamem_other_memory":
        rows = [pairing[q.conversation] for q in questions]
    else:
        rows = [q.conversation for q in questions]
    selected = memories[torch.tensor(rows, dtype=torch.long)]
    return _zero_memory(selected) if system_name == "deltamem_empty_memory" else selected


def _add_choice_scores(record: dict[str, Any], question: Question, scores: Sequence[float]) -> None:
    if question.choices:
        best = int(np.argmax(scores))  # first choice wins a tie, as in scoring.forced_choice
        record["choice"] = question.choices[best]
        record["forced_choice"] = float(question.choices[best] == question.answer)
        gold = question.choices.index(question.answer) if question.answer in question.choices else None
        record["gold_logprob"] = float(scores[gold]) if gold is not None else None
        record["choice_logprobs"] = [round(float(s), 4) for s in scores]
    else:
        record["gold_logprob"] = float(scores[0])


# ------------------------------------------------------------------------------------------------------- summaries


def primary_metric(task: MemoryTask, settings: EvalSettings) -> str:
    """What ``accuracy`` means for a task: LoCoMo F1, forced choice for closed sets, else exact match."""
    if task.scoring == "locomo":
        return "f1"
    if settings.forced_choice and task.questions and all(q.choices for q in task.questions):
        return "forced_choice"
    return "exact_match"


def _interval(values: Sequence[float], settings: EvalSettings) -> tuple[float, list[float]]:
    mean, lo, hi = bootstrap_ci(values, n_resamples=settings.n_resamples, seed=settings.seed)
    return mean, [lo, hi]


def summarize_records(records: Sequence[Mapping[str, Any]], metric: str, settings: EvalSettings) -> dict[str, Any]:
    """Per-system summary: ``accuracy`` (the primary metric) with ``accuracy_ci``, every metric with its ``_ci``,
    the mean gold log-probability, and per-group accuracy."""
    summary: dict[str, Any] = {"n": len(records), "metric": metric}
    for name in ("accuracy", "exact_match", "contains_match", "forced_choice", "f1"):
        key = metric if name == "accuracy" else name
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[name], summary[f"{name}_ci"] = _interval(values, settings)
    gold = [r["gold_logprob"] for r in records if r.get("gold_logprob") is not None]
    if gold:
        summary["gold_logprob"] = float(np.mean(gold))
    groups: dict[str, list[float]] = {}
    for r in records:
        if r.get(metric) is not None:
            groups.setdefault(r["group"], []).append(r[metric])
    if len(groups) > 1:
        summary["by_group"] = {}
        for g, values in sorted(groups.items()):
            mean, ci = _interval(values, settings)
            summary["by_group"][g] = {"n": len(values), "accuracy": mean, "accuracy_ci": ci}
    return summary


def _diagnostics(per_system: Mapping[str, list[dict]], task: MemoryTask, settings: EvalSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    own, other = per_system.get("deltamem"), per_system.get("deltamem_other_memory")
    if own and other:
        gaps = [
            a["gold_logprob"] - b["gold_logprob"]
            for a, b in zip(own, other, strict=True)
            if a.get("gold_logprob") is not None and b.get("gold_logprob") is not None
        ]
        if gaps:
            mean, ci = _interval(gaps, settings)
            # > 0: the reference answer is likelier under the conversation's own memory than under another one's,
            # i.e. the adapter reads content from memory (not just the answer format).
            out["own_minus_other_gold_logprob"] = {"mean": mean, "ci": ci, "n": len(gaps)}
    follows = _follows_source(other or [], task)
    if follows:
        mean, ci = _interval(follows, settings)
        # How often the other-memory control answers with the value stored in the memory it read (when that
        # conversation has a question with the same answer set and another answer): high = content read from memory.
        out["other_memory_answers_source_value"] = {"mean": mean, "ci": ci, "n": len(follows)}
    closed = [q for q in task.questions if q.choices]
    if closed:
        out["chance"] = float(np.mean([1.0 / len(q.choices) for q in closed]))
    return out


def _follows_source(records: Sequence[Mapping[str, Any]], task: MemoryTask) -> list[float]:
    by_conversation: dict[str, list[Question]] = {}
    for q in task.questions:
        by_conversation.setdefault(task.conversations[q.conversation].id, []).append(q)
    hits = []
    for record in records:
        if record.get("choice") is None or record.get("memory_of") is None:
            continue
        own = next(q for q in task.questions if q.id == record["id"])
        source = next((q for q in by_conversation.get(record["memory_of"], []) if q.choices == own.choices), None)
        if source is not None and source.answer != own.answer:
            hits.append(float(record["choice"] == source.answer))
    return hits


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: MemoryTask,
    settings: EvalSettings | None = None,
    *,
    on_system_done: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every system of ``settings.systems`` on ``task`` and summarise.

    Returns a JSON-serialisable dict: ``task``, ``metric``, ``n_questions``, ``n_conversations``, ``systems``
    (name -> summary, see :func:`summarize_records`), ``diagnostics`` (own-vs-other memory gap, chance level),
    ``seconds`` per system, ``settings``, and ``records`` (per question, per system).
    """
    settings = settings or EvalSettings()
    systems = list(settings.systems)
    if any(s in MEMORY_SYSTEMS for s in systems) and not _is_deltamem(model):
        raise ValueError("the deltamem systems need a δ-mem PeftModel; pass systems=BASE_SYSTEMS for a plain model")
    if "deltamem_other_memory" in systems and len(task.conversations) < 2:
        systems.remove("deltamem_other_memory")
    was_training = getattr(model, "training", False)
    model.eval()
    metric = primary_metric(task, settings)
    seconds: dict[str, float] = {}
    memories = None
    try:
        if any(s in MEMORY_SYSTEMS for s in systems):
            start = time.perf_counter()
            memories = write_memories(model, tokenizer, task, settings)
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
        "systems": summaries,
        "diagnostics": _diagnostics(per_system, task, settings),
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
    """Evaluate the recall ladder's ``level`` (``n`` conversations of ``split``) with the memory-only protocol."""
    from .ladder import make_ladder

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


__all__ = [
    "answer_token_ids",
    "BASE_SYSTEMS",
    "MEMORY_SYSTEMS",
    "SYSTEMS",
    "SYSTEM_LABELS",
    "Conversation",
    "EvalSettings",
    "MemoryTask",
    "Question",
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
