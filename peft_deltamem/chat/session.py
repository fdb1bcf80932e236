"""`MemorySession`: a chat whose prompt holds only the recent turns while older ones live in the δ-mem memory.

The point of δ-mem is that a model can drop old turns from its prompt and still act on them. A session keeps one
:class:`~peft_deltamem.memory.state.MemoryState` (batch of one) for a δ-mem ``PeftModel`` and does the bookkeeping:

* :meth:`MemorySession.write` writes turns into the memory without generating;
* :meth:`MemorySession.reply` answers from a short prompt (system + the last ``keep_last`` non-system messages + the
  new user turn), *reading* the memory while it generates (as the training read pass does, docs/design.md §5); a message
  is written into the memory when it leaves that window (with ``keep_last = 0``: the user turn and its answer, right
  after the answer), so no message is ever in the prompt and the memory together (docs/design.md §8);
* :meth:`MemorySession.save` / :meth:`MemorySession.load` persist memory + transcript + adapter identity.

How a write is tokenised (a decision, since chat templates render a turn differently depending on its context)
----------------------------------------------------------------------------------------------------------------

Each write renders **the written messages alone** with the tokenizer's chat template
(:func:`~peft_deltamem.chat.segments.encode_conversation`), in one model call without a KV cache
(:func:`peft_deltamem.serving.window.write_messages`, which ``deltamem serve`` uses too). Which messages are written
together (a *write group*) is a function of the conversation (:func:`peft_deltamem.serving.window.plan_window`): the
messages between the window cuts of two successive user turns; with ``keep_last = 0`` a reply writes the rendering of
``[user, assistant]``. It does not re-render the whole transcript, so the cost of a turn does not grow with the length
of the chat, and a client of ``deltamem serve`` that sends the same conversation gets the same memory. Consequences:

* Tokens the template attributes to no message (message id −1: a bos token, a default system prompt such as
  SmolLM2's, Llama-3's date block, system messages) are run as *context only*: they are read-only and never written,
  whatever the adapter's write granularity. For ``token`` adapters this is done by feeding such runs in separate
  read-only calls that share a KV cache with the written ones (exact, by the continuity of token writes). The session's
  own system message is part of every prompt, so it is never written either.
* Templates that render the last assistant turn specially (Qwen3 gives it an empty ``<think></think>`` block, which it
  drops once another user turn follows) are written as rendered in isolation, i.e. as the model saw its answer when it
  generated it.
* ``message`` / ``sentence`` adapters get ``memory_segment_ids`` from the same rendering: one write per message
  (role header and end-of-turn marker included) or per sentence.

With ``write_during_generation=True`` the reply is instead written *while* it is generated (prompt and answer, as the
paper's own chat runtime does): the prompt's recent turns and system prompt are then written again on every turn. This
mode needs a ``token`` adapter, since generation has no message ids.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TextIteratorStreamer

from .._io import atomic_path
from ..memory.state import MemoryState
from ..serving.window import merge_stats, plan_window, write_messages
from .identity import AdapterMismatchError, active_adapter, adapter_identity, identity_mismatch
from .segments import validate_messages
from .templates import render_ids

__all__ = ["AdapterMismatchError", "MemorySession", "adapter_identity"]

SESSION_FORMAT = "peft_deltamem.session"
SESSION_VERSION = 1
MEMORY_FILE = "memory.safetensors"
SESSION_FILE = "session.json"
DEFAULT_MAX_NEW_TOKENS = 256


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------------------------


class MemorySession:
    """A chat with a δ-mem model: recent turns in the prompt, everything else in the memory.

    Args:
        model: a ``PeftModel`` whose active adapter is a δ-mem adapter.
        tokenizer: a fast tokenizer with a chat template.
        keep_last: how many previous non-system messages the prompt of :meth:`reply` keeps verbatim (0 = none,
            docs/design.md §8). Older messages are in the memory, each written once, when it left this window.
        system: a system message put at the start of every prompt (never written into the memory).
        chat_template_kwargs: extra arguments for the chat template, e.g. ``{"enable_thinking": False}``.
        write_during_generation: write the prompt and the answer while generating (the paper's chat runtime)
            instead of reading during generation and writing the new turn afterwards; needs a ``token`` adapter.

    Attributes:
        history: the transcript, every message written or exchanged, in order.
        written: how many messages of :attr:`history` are in the memory (the others are the prompt window).
        memory: the session's :class:`MemoryState` (one row).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        keep_last: int = 0,
        system: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        write_during_generation: bool = False,
    ) -> None:
        active_adapter(model)
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a string or None, got {type(system).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.keep_last = keep_last
        self.system = system
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.write_during_generation = bool(write_during_generation)
        self.history: list[dict[str, Any]] = []
        self.written = 0
        self.memory = MemoryState()
        # Write-gate statistics for memory_report(): of the last write and summed over the session.
        self._last_gates: dict[str, dict] = {}
        self._total_gates: dict[str, dict] = {}
        if self.write_during_generation:
            self._check_token_granularity()

    # ----- adapter -------------------------------------------------------------------------------------------------
    @property
    def adapter_config(self) -> Any:
        """The config of the model's active δ-mem adapter."""
        return active_adapter(self.model)[1]

    @property
    def write_granularity(self) -> str:
        """``token``, ``message`` or ``sentence``: what one memory write of the active adapter covers."""
        return self.adapter_config.write_granularity

    def _check_token_granularity(self) -> None:
        if self.write_granularity != "token":
            raise ValueError(
                f"write_during_generation=True needs a 'token' adapter; this one writes per {self.write_granularity}, "
                "and generation has no message ids. Use the default (write the turn after the answer)."
            )
        roles = self.adapter_config.write_roles
        if roles is not None and "assistant" not in roles:
            raise ValueError(
                f"write_during_generation=True writes the answer's tokens, but this adapter writes only {roles} "
                "messages. Use the default (write the turn after the answer)."
            )

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----- writing -------------------------------------------------------------------------------------------------
    def write(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Write ``messages`` (user/assistant/tool turns) into the memory without generating, and add them to history.

        Messages still in the prompt window are written first (as one group: they leave the window), then
        ``messages`` as one group, rendered alone with the chat template (see the module docstring); system messages and
        template preambles are context only, never written.
        """
        if isinstance(messages, Sequence) and not isinstance(messages, str) and len(messages) == 0:
            return
        messages = validate_messages(messages)
        if self.written < len(self.history):
            self._write(self.history[self.written :])
        self._write(messages)
        self.history.extend(dict(m) for m in messages)
        self.written = len(self.history)

    def _write(self, messages: list[dict[str, Any]]) -> None:
        stats, _ = write_messages(
            self.model, self.tokenizer, self.memory, messages, chat_template_kwargs=self.chat_template_kwargs
        )
        if stats:
            self._last_gates = stats
            merge_stats(self._total_gates, stats)

    def _plan(self, user_text: str) -> Any:
        """The window plan of a reply to ``user_text``: what is still unwritten + the new turn (docs/design.md §8)."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        pending = [dict(m) for m in self.history[self.written :]]
        return plan_window([*system, *pending, {"role": "user", "content": user_text}], self.keep_last)

    def _write_left_window(self, user_text: str = "") -> None:
        """Write the groups that leave the window before a reply to ``user_text`` (the next one, by default)."""
        for group in self._plan(user_text).groups:
            self._write(group)
            self.written += len(group)

    # ----- replying ------------------------------------------------------------------------------------------------
    def prompt_messages(self, user_text: str) -> list[dict[str, Any]]:
        """The messages of the prompt :meth:`reply` would use: system + the last ``keep_last`` non-system messages +
        ``user_text``."""
        return self._plan(user_text).prompt

    def _prompt_ids(self, messages: list[dict[str, Any]]) -> torch.Tensor:
        _, ids = render_ids(self.tokenizer, messages, self.chat_template_kwargs, add_generation_prompt=True)
        return torch.tensor([ids], device=self._device)

    def _generation_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        for forbidden in ("memory", "memory_write", "input_ids", "attention_mask"):
            if forbidden in kwargs:
                raise ValueError(f"reply() sets {forbidden!r} itself; do not pass it.")
        if (kwargs.get("num_return_sequences") or 1) != 1:
            raise ValueError("reply() returns one answer per turn; num_return_sequences must be 1.")
        if "max_new_tokens" not in kwargs and "max_length" not in kwargs:
            kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        if kwargs.get("pad_token_id") is None and self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        if "eos_token_id" not in kwargs and self.tokenizer.eos_token_id is not None:
            # The template's end-of-turn token must end the answer even if the model's generation config names
            # another end-of-sequence token.
            eos = self.model.generation_config.eos_token_id
            eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
            kwargs["eos_token_id"] = list(dict.fromkeys([*eos, self.tokenizer.eos_token_id]))
        return kwargs

    def reply(self, user_text: str, **generate_kwargs: Any) -> str:
        """Answer ``user_text`` from the short prompt (see :meth:`prompt_messages`) and the memory.

        Generation reads the memory without writing it; then the new user turn and the answer are appended to
        :attr:`history`, and the messages that have left the window are written (with ``keep_last = 0`` the user turn
        and the answer, as one write). ``generate_kwargs`` go to ``generate`` (e.g.
        ``max_new_tokens`` (default 256), ``do_sample``, ``streamer=TextStreamer(tokenizer, skip_prompt=True)``).
        Returns the answer text (special tokens removed, surrounding whitespace stripped).
        """
        if not isinstance(user_text, str):
            raise TypeError(f"user_text must be a string, got {type(user_text).__name__}")
        if self.write_during_generation:
            self._check_token_granularity()
        kwargs = self._generation_kwargs(generate_kwargs)
        if not self.write_during_generation:
            self._write_left_window(user_text)  # nothing, unless messages were added to history by hand
        input_ids = self._prompt_ids(self.prompt_messages(user_text))
        with torch.no_grad():
            outputs = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                memory=self.memory,
                memory_write=self.write_during_generation,
                **kwargs,
            )
        sequences = outputs if torch.is_tensor(outputs) else outputs.sequences
        answer = self.tokenizer.decode(sequences[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        if self.write_during_generation:
            self.written = len(self.history)
        else:
            self._write_left_window()
        return answer

    def stream_reply(self, user_text: str, **generate_kwargs: Any) -> Iterator[str]:
        """:meth:`reply`, yielding the answer's text as it is generated (a ``TextIteratorStreamer``).

        Generation runs in a background thread. The turn is written and added to :attr:`history` when generation
        ends; closing the generator early waits for that. An error in generation is raised from the generator.
        """
        if "streamer" in generate_kwargs:
            raise ValueError("stream_reply() makes its own streamer; use reply(..., streamer=...) for your own.")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.reply(user_text, streamer=streamer, **generate_kwargs)
            except BaseException as err:  # re-raised in the caller's thread below
                failure.append(err)
                streamer.end()  # unblock the consumer; generate() did not get to end the stream

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            thread.join()
        if failure:
            raise failure[0]

    # ----- inspection ----------------------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, dict[str, Any]]:
        """Per adapted layer: state norms and write-gate statistics (what ``/memory`` shows).

        Each entry has ``norm`` (Frobenius norm of the layer's state, all state heads), ``head_norms`` (per state
        head), ``writes`` (memory writes this session: tokens or segments), ``beta_mean`` / ``beta_max`` (write gate β
        over those writes) and ``last_beta_mean`` (β over the last write call). Empty before anything is written.
        Gate statistics are not collected for ``write_during_generation`` writes.
        """
        report: dict[str, dict[str, Any]] = {}
        for layer, norms in self.memory.norms().items():
            head_norms = norms[0].cpu()  # one row
            total, last = self._total_gates.get(layer, {}), self._last_gates.get(layer, {})
            report[layer] = {
                "norm": float(head_norms.pow(2).sum().sqrt()),
                "head_norms": [float(x) for x in head_norms],
                "writes": int(total.get("writes", 0)),
                "beta_mean": total["beta_sum"] / total["beta_count"] if total.get("beta_count") else None,
                "beta_max": total.get("beta_max"),
                "last_beta_mean": last["beta_sum"] / last["beta_count"] if last.get("beta_count") else None,
            }
        return report

    def reset(self) -> None:
        """Forget everything: empty memory, empty history, no gate statistics."""
        self.memory.reset()
        self.history.clear()
        self.written = 0
        self._last_gates, self._total_gates = {}, {}

    # ----- files ---------------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Save the session to ``directory``: ``memory.safetensors`` + ``session.json`` (transcript, settings,
        adapter identity, gate statistics).

        The directory is written under a temporary name and renamed onto ``directory`` when complete, so a crash
        mid-save leaves an earlier save there intact.
        """
        data = {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "adapter": adapter_identity(self.model),
            "settings": {
                "keep_last": self.keep_last,
                "system": self.system,
                "chat_template_kwargs": self.chat_template_kwargs,
                "write_during_generation": self.write_during_generation,
            },
            "memory_file": None if self.memory.is_empty else MEMORY_FILE,
            "history": self.history,
            "written": self.written,
            "gate_stats": {"last": self._last_gates, "total": self._total_gates},
        }
        with atomic_path(directory, directory=True) as tmp:
            if not self.memory.is_empty:
                self.memory.save(tmp / MEMORY_FILE)
            _write_json(tmp / SESSION_FILE, data)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Any, tokenizer: Any, **settings: Any) -> MemorySession:
        """Load a session saved by :meth:`save` into ``model`` / ``tokenizer``.

        ``settings`` (``keep_last``, ``system``, ``chat_template_kwargs``, ``write_during_generation``) override the
        saved ones. Raises :class:`AdapterMismatchError` if the session was saved for another adapter (other config or
        other weights), ``ValueError`` for a directory that is not a saved session.
        """
        directory = Path(directory)
        path = directory / SESSION_FILE
        if not path.is_file():
            raise ValueError(f"{directory} is not a saved MemorySession (no {SESSION_FILE}).")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not readable session JSON ({err}).") from err
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise ValueError(f"{path} is not a MemorySession file (no '{SESSION_FORMAT}' format marker).")
        if data.get("version") != SESSION_VERSION:
            raise ValueError(f"{path} has session format version {data.get('version')!r}; expected {SESSION_VERSION}.")
        mismatch = identity_mismatch(data.get("adapter") or {}, adapter_identity(model))
        if mismatch:
            raise AdapterMismatchError(
                f"The session in {directory} was saved for another adapter than the model's active one: {mismatch}. "
                "Load it into the model with the adapter it was saved with, or start a new session."
            )
        session = cls(model, tokenizer, **{**data.get("settings", {}), **settings})
        if data.get("memory_file"):
            device = session._device
            session.memory = MemoryState.load(directory / data["memory_file"], device=device)
        history = data.get("history") or []
        session.history = validate_messages(history) if history else []
        written = data.get("written", len(session.history))  # sessions saved before the window rule: all written
        session.written = written if isinstance(written, int) and 0 <= written <= len(session.history) else 0
        gates = data.get("gate_stats") or {}
        session._last_gates, session._total_gates = gates.get("last", {}), gates.get("total", {})
        return session
