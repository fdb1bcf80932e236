"""The engine interface of ``deltamem serve`` and its transformers implementation.

An :class:`Engine` owns the model: it renders prompts, writes message groups into a memory and generates answers
that read a memory without writing it. The server never touches the model itself, so another engine (vLLM, issue 15)
can take this one's place.

:class:`TransformersEngine` runs every model call in one worker thread. Generation requests of different sessions
that arrive within ``max_wait_s`` of each other are batched into one ``generate`` call (up to ``max_batch_size``
rows): prompts left-padded, the sessions' memories stacked as the rows of one :class:`MemoryState`. Greedy requests
batch together; a sampled request runs alone, so its ``seed`` gives the same answer whatever else is running. Writes
(a message group into a memory) that arrive together are batched the same way, into one forward
(:func:`~peft_deltamem.serving.writes.write_groups`: each memory gets what writing it alone gives).
Requests of one session are never in flight together (the server serialises them), so their order is kept.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..memory.state import MemoryState
from .writes import write_groups

__all__ = ["Completion", "Engine", "GenerationJob", "SamplingParams", "TokenizerEngine", "TransformersEngine"]

_VOLATILE = frozenset({"base_model_name_or_path", "revision", "inference_mode", "scan_impl", "scan_chunk_size"})


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is decoded (OpenAI's fields); ``temperature == 0`` is greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether the answer is decoded greedily (and so may share a batch with other greedy answers)."""
        return self.temperature <= 0.0


@dataclass
class GenerationJob:
    """One answer to generate: the prompt's token ids, the memory it reads (one row; None = empty) and how."""

    prompt_ids: list[int]
    memory: MemoryState | None
    params: SamplingParams
    on_delta: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Completion:
    """A generated answer: its text, token counts and why it ended (``stop`` or ``length``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    batch_size: int = 1
    queue_wait_s: float = 0.0


class Engine:
    """What the server needs from a model. Methods returning a ``Future`` may run the work on another thread."""

    model_id: str = "deltamem"

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The token ids of the prompt for ``messages`` (with the generation prompt)."""
        raise NotImplementedError

    def submit_write(self, memory: MemoryState | None, messages: Sequence[Mapping[str, Any]]) -> Future:
        """Write one message group into a copy of ``memory`` (None = empty); the future gives (memory, tokens)."""
        raise NotImplementedError

    def submit_generate(self, job: GenerationJob) -> Future:
        """Generate ``job``'s answer, reading its memory; the future gives a :class:`Completion`."""
        raise NotImplementedError

    def check_memory(self, memory: MemoryState) -> str | None:
        """Why ``memory`` does not belong to this engine's adapter, or None if it does."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Finish the work already submitted, then stop."""


class _BatchStreamer(BaseStreamer):
    """Collects the tokens of every row as ``generate`` produces them and reports text deltas to the rows' callbacks."""

    def __init__(self, engine: TransformersEngine, jobs: Sequence[GenerationJob]) -> None:
        self.engine, self.jobs = engine, jobs
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.emitted = ["" for _ in jobs]
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            job = self.jobs[row]
            if len(self.tokens[row]) >= job.params.max_tokens:
                continue  # a batch runs to its longest request's max_tokens; this row has all it asked for
            self.tokens[row].append(int(token))
            if job.on_delta is None:
                continue
            text, _ = self.engine._streamed(self.tokens[row], job.params)
            if text.startswith(self.emitted[row]) and len(text) > len(self.emitted[row]):
                job.on_delta(text[len(self.emitted[row]) :])
                self.emitted[row] = text

    def end(self) -> None:
        """Nothing to do: the final deltas are sent with the results."""


def _greedy(item: tuple) -> bool:
    return item[0] == "generate" and item[1].params.greedy


def _held_back(text: str, stop: Sequence[str]) -> str:
    """``text`` without a tail that could still become a stop string, an incomplete character or trailing spaces."""
    keep = len(text)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    text = text[:keep]
    return text.rstrip("\ufffd").rstrip()


class TokenizerEngine(Engine):
    """What every engine of this package shares: prompts, answer text and memory checks from a Hugging Face
    tokenizer, and one worker thread that runs the model calls, fed through a queue.

    A subclass sets ``tokenizer``, ``chat_template_kwargs``, ``eos_ids`` (the ids that end an answer, see
    :meth:`_end_ids`) and ``template`` (an empty memory of its adapter, sized: one row), then calls
    :meth:`_start_worker`; its ``_run`` takes ``(kind, payload, future)`` items off ``_queue`` ("write", "generate",
    then one "stop") and finishes what it holds before returning. Every engine renders prompts and turns tokens into
    answer text the same way, so an answer is the same text whichever engine generated its tokens.
    """

    tokenizer: Any
    chat_template_kwargs: dict[str, Any]
    eos_ids: list[int]
    template: MemoryState
    _join_timeout_s: float = 60.0  # how long shutdown waits for the worker to finish its work

    @staticmethod
    def _end_ids(generation_eos: int | Sequence[int] | None, tokenizer: Any) -> list[int]:
        """The ids that end an answer: the generation config's end-of-sequence ids, then the tokenizer's, once each."""
        ids = [] if generation_eos is None else [generation_eos] if isinstance(generation_eos, int) else generation_eos
        return list(dict.fromkeys([*ids, *([] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])]))

    def _start_worker(self, name: str) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def submit_write(self, memory: MemoryState | None, messages: Sequence[Mapping[str, Any]]) -> Future:
        future: Future = Future()
        self._queue.put(("write", (memory, [dict(m) for m in messages]), future))
        return future

    def submit_generate(self, job: GenerationJob) -> Future:
        self._queue.put(("generate", job, job.future))
        return job.future

    def shutdown(self) -> None:
        self._stopping = True
        self._queue.put(("stop", None, None))
        self._thread.join(timeout=self._join_timeout_s)

    def check_memory(self, memory: MemoryState) -> str | None:
        if memory.layout != self.template.layout:
            return f"the memory has {memory.layout.describe() if memory.layout else 'no layout'}, the adapter {self.template.layout.describe()}"
        ours = {k: v for k, v in self.template.adapter_config.items() if k not in _VOLATILE}
        theirs = {k: v for k, v in memory.adapter_config.items() if k not in _VOLATILE}
        differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differing:
            return "the adapter config differs in " + ", ".join(differing[:6])
        if memory.batch_size != 1:
            return f"the memory holds {memory.batch_size} rows, a session has one"
        return None

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _finish(self, tokens: Sequence[int], params: SamplingParams) -> tuple[str, bool]:
        """The answer text of ``tokens`` so far and whether it has ended (end of sequence or a stop string)."""
        ended = False
        for i, t in enumerate(tokens):
            if t in self.eos_ids:  # decoded as MemorySession does: the end token too (special ones are skipped)
                tokens, ended = tokens[: i + 1], True
                break
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True).lstrip()
        cut = min((text.find(s) for s in params.stop if s and s in text), default=-1)
        if cut >= 0:
            text, ended = text[:cut], True
        return (text.strip() if ended else text), ended

    def _answer(self, tokens: Sequence[int], params: SamplingParams) -> tuple[str, int, str]:
        """The final answer of ``tokens``: its text, the tokens it counts (up to the end token) and its finish reason."""
        text, ended = self._finish(tokens, params)
        eos_at = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        count = eos_at + 1 if eos_at is not None else len(tokens)
        return (text if ended else text.strip()), count, ("stop" if ended else "length")

    def _streamed(self, tokens: Sequence[int], params: SamplingParams) -> tuple[str, bool]:
        """What a stream may show of ``tokens`` so far (no tail that could still change), and whether it ended."""
        text, done = self._finish(tokens, params)
        return (text if done else _held_back(text, params.stop)), done


class TransformersEngine(TokenizerEngine):
    """A ``PeftModel`` with an active δ-mem adapter and its tokenizer, served from one worker thread.

    Args:
        model: the δ-mem ``PeftModel`` (eval mode).
        tokenizer: its fast tokenizer with a chat template.
        model_id: the name ``/v1/models`` lists.
        chat_template_kwargs: extra arguments for the chat template.
        max_batch_size: the most answers generated in one batch.
        max_wait_s: how long a batch waits for the next request to share it (restarted at every arrival).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str = "deltamem",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        max_batch_size: int = 8,
        max_wait_s: float = 0.05,
    ) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.max_batch_size, self.max_wait_s = max(1, int(max_batch_size)), max(0.0, float(max_wait_s))
        self.device = next(model.parameters()).device
        self.eos_ids = self._end_ids(model.generation_config.eos_token_id, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.template = self._empty_memory()
        self.batches: deque[int] = deque(maxlen=1024)  # sizes of the latest batches generated
        self.write_batches: deque[int] = deque(maxlen=1024)  # and written
        self._pending: deque = deque()
        self._start_worker("deltamem-engine")

    # ----- helpers -------------------------------------------------------------------------------------------------
    def _empty_memory(self) -> MemoryState:
        memory = MemoryState()
        ids = torch.tensor([[self.pad_id]], device=self.device)
        with torch.no_grad():
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), memory=memory, memory_write=True)
        return memory.zeros_like()

    # ----- the worker ----------------------------------------------------------------------------------------------
    def _next(self, timeout: float | None = None) -> tuple | None:
        if self._pending:
            return self._pending.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()
        except queue.Empty:
            return None

    def _run(self) -> None:
        while True:
            item = self._next()
            kind, payload, future = item
            if kind == "stop":
                while self._pending:  # finish what was collected before the stop
                    self._dispatch(self._pending.popleft())
                return
            self._dispatch(item)

    def _dispatch(self, item: tuple) -> None:
        kind, payload, future = item
        if kind == "write":
            self._write_batch([item, *self._collect(lambda other: other[0] == "write")])
        elif kind == "generate":
            jobs = [payload]
            if payload.params.greedy:
                jobs += [other[1] for other in self._collect(_greedy)]
            self._generate_batch(jobs)

    def _collect(self, fits: Callable[[tuple], bool]) -> list[tuple]:
        """Queued items that ``fit`` the batch, each arriving within ``max_wait_s`` of the one before (others wait in
        ``_pending``, in order).

        The wait restarts at every arrival, so a burst of clients that reach the queue a few milliseconds apart (each
        request is parsed, windowed and looked up in the store first) fills one batch, while a lone request waits
        ``max_wait_s`` once; ``max_batch_size`` bounds the whole wait.
        """
        more: list[tuple] = []
        deadline = time.monotonic() + self.max_wait_s
        skipped: list[tuple] = []
        while len(more) + 1 < self.max_batch_size:
            pending = [p for p in self._pending if fits(p)]
            if pending:
                self._pending.remove(pending[0])
                more.append(pending[0])
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if item[0] != "stop" and fits(item):
                more.append(item)
                deadline = time.monotonic() + self.max_wait_s
            else:
                skipped.append(item)
                if item[0] == "stop":
                    break
        self._pending.extend(skipped)
        return more

    def _write_batch(self, items: list[tuple]) -> None:
        """Write the groups of ``items`` (different memories) in one forward; alone again if the batch fails."""
        live = [(payload, future) for _, payload, future in items if future.set_running_or_notify_cancel()]
        if not live:
            return
        memories = [self.template if m is None else m.to(self.device) for (m, _), _ in live]  # the store: on the CPU
        try:
            results = write_groups(
                self.model,
                self.tokenizer,
                memories,
                [messages for (_, messages), _ in live],
                pad_id=self.pad_id,
                chat_template_kwargs=self.chat_template_kwargs,
            )
        except BaseException as err:
            if len(live) == 1:
                live[0][1].set_exception(err)
                return
            for payload, future in live:  # one bad group must not fail the others: each alone again
                alone: Future = Future()
                self._write_batch([("write", payload, alone)])
                if alone.exception() is None:
                    future.set_result(alone.result())
                else:
                    future.set_exception(alone.exception())
            return
        self.write_batches.append(len(live))
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)

    def _generate_batch(self, jobs: list[GenerationJob]) -> None:
        started = time.monotonic()
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            completions = self._generate(live)
        except BaseException as err:
            for job in live:
                job.future.set_exception(err)
            return
        self.batches.append(len(live))
        for job, completion in zip(live, completions, strict=True):
            wait = started - job.queued_at
            job.future.set_result(
                Completion(completion[0], len(job.prompt_ids), completion[1], completion[2], len(live), wait)
            )

    def _generate(self, jobs: list[GenerationJob]) -> list[tuple[str, int, str]]:
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):  # left padding
            ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids) :] = 1
        memory = MemoryState.cat([self.template if j.memory is None else j.memory.to(self.device) for j in jobs])
        params = jobs[0].params
        kwargs: dict[str, Any] = {"do_sample": False}
        if not params.greedy:
            kwargs = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
            if params.seed is not None:
                torch.manual_seed(params.seed)
        streamer = _BatchStreamer(self, jobs) if any(job.on_delta for job in jobs) else None
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                memory=memory,
                memory_write=False,
                max_new_tokens=max(job.params.max_tokens for job in jobs),
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                streamer=streamer,
                **kwargs,
            )
        sequences = out if torch.is_tensor(out) else out.sequences
        results = []
        for row, job in enumerate(jobs):
            tokens = sequences[row, width:].tolist()[: job.params.max_tokens]
            text, count, finish_reason = self._answer(tokens, job.params)
            if job.on_delta is not None:
                emitted = streamer.emitted[row] if streamer else ""
                if text.startswith(emitted) and len(text) > len(emitted):
                    job.on_delta(text[len(emitted) :])
            results.append((text, count, finish_reason))
        return results
