"""``deltamem serve --engine vllm``: the server's :class:`~peft_deltamem.serving.engine.Engine` on an in-process vLLM.

:class:`VllmEngine` serves a checkpoint written by ``deltamem export-vllm`` (:mod:`.export`). It owns a vLLM
``LLMEngine`` and steps it from one worker thread: every request submitted before a step joins that step, so the
answers of different sessions share vLLM's continuous batches (and a request arriving mid-answer joins at the next
step); streaming reads each step's tokens. A thread rather than ``AsyncLLM``: the server's engine interface hands out
``concurrent.futures`` from any thread, and one thread that owns the engine needs no event loop of its own.

Memories cross as :class:`~peft_deltamem.MemoryState` files in a private temporary directory, through the δ-mem
connector (:mod:`.requests`): a write is a history write (the group's tokens as the prompt, ``max_tokens=1``,
started from the session's memory file, saved to a new one) with the template's context positions read but not
written, exactly the runs :func:`~peft_deltamem.serving.window.write_messages` writes; an answer is a read-only
request. Files are deleted as soon as their request ends.

This module imports vLLM only when an engine is built; ``import peft_deltamem`` and the serving package never import it.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..chat.segments import encode_conversation
from ..memory.state import MemoryLayout, MemoryState
from ..serving.engine import Completion, GenerationJob, TokenizerEngine
from ..serving.window import written_runs
from .requests import kv_transfer_config, memory_request, wait_for_saved_memory

__all__ = ["VllmEngine", "empty_memory"]


def empty_memory(checkpoint: str | os.PathLike) -> MemoryState:
    """The empty memory (one row, zeros) of the adapter in a ``deltamem export-vllm`` checkpoint.

    It has the layout and adapter config the engine's saved memories have, so the server can check imported
    memories against it. Raises ``ValueError`` for a directory that is not such a checkpoint.
    """
    config_path = Path(checkpoint) / "config.json"
    try:
        section = json.loads(config_path.read_text()).get("deltamem")
    except (OSError, ValueError) as err:
        raise ValueError(f"{checkpoint} is not a vLLM checkpoint (cannot read {config_path}: {err})") from err
    if not section:
        raise ValueError(
            f"{checkpoint} is not a δ-mem vLLM checkpoint (no 'deltamem' section in its config.json); "
            "write one with: deltamem export-vllm ADAPTER OUT --base BASE"
        )
    adapter_config = dict(section["adapter_config"])
    layers = tuple(key for _, key in sorted((int(i), k) for i, k in section["layers"].items()))
    r, heads = int(adapter_config["r"]), int(adapter_config["num_state_heads"])
    memory = MemoryState()
    memory.layout = MemoryLayout(r, heads, layers)
    memory.adapter_config = adapter_config
    memory.states = {name: torch.zeros(1, heads, r, r) for name in layers}
    return memory


@dataclass
class _Request:
    """A request in the vLLM engine: what it answers and the memory files it owns."""

    future: Future
    files: list[str]
    job: GenerationJob | None = None  # an answer; None for a write
    written: int = 0  # a write: the tokens it writes
    batch_size: int = 1
    queue_wait_s: float = 0.0
    emitted: str = ""
    tokens: list[int] = field(default_factory=list)


class VllmEngine(TokenizerEngine):
    """A ``deltamem export-vllm`` checkpoint served by an in-process vLLM engine (see the module doc).

    Args:
        checkpoint: the exported checkpoint directory (it holds the tokenizer too).
        model_id: the name ``/v1/models`` lists.
        chat_template_kwargs: extra arguments for the chat template.
        max_batch_size: the most requests in one vLLM batch (``max_num_seqs``).
        llm_kwargs: more arguments for ``vllm.LLM`` (``max_model_len``, ``dtype``, ``enforce_eager``,
            ``gpu_memory_utilization`` ...); they override this engine's defaults.
        work_dir: where the private directory of memory files is made (default: the system's temporary directory).
    """

    _join_timeout_s = 120.0  # an engine step of a long prompt on CPU can take a while

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        model_id: str = "deltamem",
        chat_template_kwargs: dict[str, Any] | None = None,
        max_batch_size: int = 8,
        llm_kwargs: dict[str, Any] | None = None,
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM

        self.checkpoint, self.model_id = Path(checkpoint), model_id
        self.template = empty_memory(self.checkpoint)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.checkpoint))
        try:
            eos = GenerationConfig.from_pretrained(str(self.checkpoint)).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        self.eos_ids = self._end_ids(eos, self.tokenizer)  # as TransformersEngine: the answer ends at any of them
        settings: dict[str, Any] = dict(
            model=str(self.checkpoint),
            kv_transfer_config=kv_transfer_config(),
            enable_prefix_caching=False,  # a δ-mem state depends on the memory a request starts from
            max_num_seqs=max(1, int(max_batch_size)),
            seed=0,
        )
        settings.update(llm_kwargs or {})
        self._dir = tempfile.mkdtemp(prefix="deltamem-vllm-", dir=None if work_dir is None else str(work_dir))
        try:
            self.llm = LLM(**settings)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._engine = self.llm.llm_engine
        self.max_model_len = int(self._engine.model_config.max_model_len)  # the longest prompt + answer vLLM runs
        self._ids = itertools.count()
        self._requests: dict[str, _Request] = {}
        self._failed: BaseException | None = None
        self._start_worker("deltamem-vllm-engine")

    def shutdown(self) -> None:
        super().shutdown()  # the worker finishes what it holds
        core = getattr(self._engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ----- the worker ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while True:
            busy = bool(self._requests)
            items = []
            try:
                items.append(self._queue.get(block=not busy and not stopping))
                while True:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            for kind, payload, future in items:
                if kind == "stop":
                    stopping = True
                else:
                    self._add(kind, payload, future)
            if not self._requests:
                if stopping:
                    return
                continue
            try:
                outputs = self._engine.step()
            except BaseException as err:  # the engine died: fail what it held and everything after
                self._failed = err
                for request_id in list(self._requests):
                    self._end(request_id).future.set_exception(err)
                continue
            for output in outputs:
                try:
                    self._update(output)
                except BaseException as err:  # this request fails (a callback, a decode), the engine goes on
                    if output.request_id in self._requests:
                        if not output.finished:
                            self._engine.abort_request([output.request_id])
                        request = self._end(output.request_id)
                        if not request.future.done():
                            request.future.set_exception(err)

    def _file(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _add(self, kind: str, payload: Any, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        if self._failed is not None:
            future.set_exception(RuntimeError(f"the vLLM engine has failed: {self._failed}"))
            return
        request_id = f"deltamem-{next(self._ids)}"
        try:
            if kind == "write":
                self._add_write(request_id, *payload, future)
            else:
                self._add_generate(request_id, payload)
        except BaseException as err:  # a prompt vLLM refuses (too long ...): this request fails, no other
            request = self._requests.pop(request_id, None)
            for path in request.files if request else []:
                _remove(path)
            future.set_exception(err)

    def _load_file(self, request_id: str, memory: MemoryState | None) -> str | None:
        if memory is None or memory.is_empty:
            return None
        path = self._file(f"{request_id}-in.safetensors")
        memory.save(path)
        return path

    def _add_write(self, request_id: str, memory: MemoryState | None, messages: list[dict], future: Future) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seg = encode_conversation(
            self.tokenizer,
            messages,
            chat_template_kwargs=self.chat_template_kwargs,
            write_roles=self.template.adapter_config.get("write_roles"),
        )
        runs = written_runs(seg.message_ids)
        written = sum(length for flag, length in runs if flag)
        if written == 0:  # nothing to write (as write_groups: the memory unchanged)
            future.set_result(((self.template if memory is None else memory).clone(), 0))
            return
        unwritten, start = [], 0
        for flag, length in runs:
            if not flag:
                unwritten.append((start, start + length))
            start += length
        request = self._requests[request_id] = _Request(future, [], written=written)
        load = self._load_file(request_id, memory)
        request.files += [p for p in (load, self._file(f"{request_id}-out.safetensors")) if p]
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            ignore_eos=True,  # so it ends by its length: saved in the step that ends it
            detokenize=False,
            extra_args={"kv_transfer_params": memory_request(load, request.files[-1], unwritten=unwritten)},
        )
        self._engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(seg.input_ids[:start])), params)

    def _add_generate(self, request_id: str, job: GenerationJob) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        request = self._requests[request_id] = _Request(job.future, [], job=job)
        request.queue_wait_s = time.monotonic() - job.queued_at
        load = self._load_file(request_id, job.memory)
        request.files += [load] if load else []
        p = job.params
        sampling = (
            dict(temperature=p.temperature, top_p=p.top_p, seed=p.seed) if not p.greedy else dict(temperature=0.0)
        )
        params = SamplingParams(
            max_tokens=p.max_tokens,
            stop_token_ids=self.eos_ids,  # stop strings are found here, in the decoded text (see _update)
            detokenize=False,  # prompts arrive as token ids and answers are decoded here, as the other engine does
            extra_args={"kv_transfer_params": memory_request(load, read_only=True)},
            **sampling,
        )
        self._engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(job.prompt_ids)), params)
        request.batch_size = sum(1 for r in self._requests.values() if r.job is not None)

    def _end(self, request_id: str) -> _Request:
        request = self._requests.pop(request_id)
        for path in request.files:
            _remove(path)
        return request

    def _update(self, output: Any) -> None:
        request = self._requests.get(output.request_id)
        if request is None:  # ended here already (a stop string), or not ours
            return
        if request.job is None:
            if output.finished:
                self._finish_write(output.request_id, output)
            return
        job = request.job
        request.tokens = list(output.outputs[0].token_ids)[: job.params.max_tokens]
        if not output.finished and job.on_delta is None and not job.params.stop:
            return  # nothing to show or look for before the end
        text, ended = self._streamed(request.tokens, job.params)
        if job.on_delta is not None and text.startswith(request.emitted) and len(text) > len(request.emitted):
            job.on_delta(text[len(request.emitted) :])
            request.emitted = text
        if not output.finished and not ended:
            return
        if not output.finished:  # a stop string: vLLM does not know them (it sees token ids only)
            self._engine.abort_request([output.request_id])
        self._end(output.request_id)
        text, count, finish_reason = self._answer(request.tokens, job.params)
        if job.on_delta is not None and text.startswith(request.emitted) and len(text) > len(request.emitted):
            job.on_delta(text[len(request.emitted) :])
        job.future.set_result(
            Completion(text, len(job.prompt_ids), count, finish_reason, request.batch_size, request.queue_wait_s)
        )

    def _finish_write(self, request_id: str, output: Any) -> None:
        request = self._requests[request_id]
        try:
            path = wait_for_saved_memory(output.kv_transfer_params, timeout=60)
            memory = MemoryState.load(path)
        except BaseException as err:
            self._end(request_id)
            request.future.set_exception(err)
            return
        self._end(request_id)
        request.future.set_result((memory, request.written))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
