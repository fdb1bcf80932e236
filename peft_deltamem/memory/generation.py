"""Generation with a memory: `model.generate(..., memory=mem)` for greedy, sampling and beam search.

The memory travels inside the KV cache (:class:`MemoryCache`), so transformers' own generation loop carries it:
prefill writes the prompt, every decoded token is read-before-write, and beam search reorders the memory rows
together with the key/value rows. Afterwards the caller's memory holds the prompt and the generated tokens, each
written exactly once (tokens after a sequence's end are never written).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig

from .._compat import cache_keyword, cache_kwargs, given_cache
from .state import MemoryState


class MemoryCache(DynamicCache):
    """A `DynamicCache` that also carries a :class:`MemoryState` through generation.

    Rows follow the cache: ``reorder_cache`` (beam search), ``batch_repeat_interleave`` and ``batch_select_indices``
    apply to the memory too. ``eos_token_ids`` mark where a sequence ends: after a row has fed one of them as a decoded
    token, its further (padding) tokens are neither read nor written.
    """

    def __init__(
        self,
        memory: MemoryState,
        *,
        config=None,
        write: bool = True,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        super().__init__(config=config)
        self.memory = memory
        self.memory_write = write
        self.eos_token_ids = list(eos_token_ids or [])
        self.finished: torch.Tensor | None = None  # [B] bool, rows whose sequence has ended
        self.tokens_with_memory = 0  # positions fed through model calls that found this cache's memory

    def memory_call(
        self, input_ids: torch.Tensor | None, batch: int, length: int
    ) -> tuple[MemoryState, torch.Tensor | None]:
        """Prepare the memory for one model call of ``length`` new positions: returns it and a [B] mask of rows that
        may read and write."""
        decoding = self.get_seq_length() > 0
        self.tokens_with_memory += length
        if not decoding and self.memory.batch_size not in (None, batch) and batch % self.memory.batch_size == 0:
            # generate() expanded the batch (beams / several return sequences): expand the memory likewise.
            self._select_rows(torch.arange(self.memory.batch_size).repeat_interleave(batch // self.memory.batch_size))
        if self.finished is None or not decoding:
            device = input_ids.device if input_ids is not None else None
            self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        active = ~self.finished
        if decoding and input_ids is not None and self.eos_token_ids:
            ended = torch.isin(input_ids[:, -1], torch.tensor(self.eos_token_ids, device=input_ids.device))
            self.finished = self.finished | ended
        return self.memory, active

    def _select_rows(self, rows: torch.Tensor) -> None:
        self.memory.select_rows_(rows)
        if self.finished is not None:
            self.finished = self.finished.index_select(0, rows.to(self.finished.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder key/value rows and memory rows for beam search."""
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times, memory included."""
        super().batch_repeat_interleave(repeats)
        rows = self.memory.batch_size or (0 if self.finished is None else len(self.finished))
        self._select_rows(torch.arange(rows).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the given rows, memory included."""
        super().batch_select_indices(indices)
        self._select_rows(indices)


def _eos_ids(generation_config: GenerationConfig, kwargs: dict) -> list[int]:
    eos = kwargs.get("eos_token_id", generation_config.eos_token_id)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _generated_mask(generated: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for generated tokens up to and including each row's first end-of-sequence token, 0 after it."""
    if not eos_ids or generated.shape[1] == 0:
        return torch.ones_like(generated)
    is_eos = torch.isin(generated, torch.tensor(eos_ids, device=generated.device)).long()
    ended_before = (is_eos.cumsum(-1) - is_eos) > 0
    return (~ended_before).long()


def generate_with_memory(
    model, *args: Any, memory: MemoryState | None = None, memory_write: bool = True, **kwargs: Any
) -> Any:
    """Run ``model.generate`` with ``memory`` carried through a :class:`MemoryCache` (see the module docstring).

    ``memory`` is advanced in place only if generation succeeds; without ``memory`` a temporary one is used.
    With ``memory_write=False`` the memory is only read. With beam search (or several return sequences) the memory
    afterwards has one row per returned sequence.
    """
    if given_cache(kwargs) is not None:
        raise ValueError(
            "generate(memory=...) builds its own cache; to continue from a cache, pass a peft_deltamem.MemoryCache "
            f"as {cache_keyword(model)}= and no memory=."
        )
    # The prompt as generate() takes it: input_ids=, inputs= (its own name for the first argument) or positional.
    input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if input_ids is None:
        raise ValueError("generate(memory=...) needs input_ids.")
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
        kwargs["attention_mask"] = attention_mask
    generation_config = kwargs.get("generation_config") or model.generation_config
    eos_ids = _eos_ids(generation_config, kwargs)
    user_memory = memory if memory is not None else MemoryState()
    start = user_memory.clone()
    working = user_memory.clone()
    cache = MemoryCache(working, config=model.config, write=memory_write, eos_token_ids=eos_ids)
    use_cache = {"use_cache": True}
    if kwargs.get("generation_config") is not None:
        # transformers deprecates generation arguments beside a generation_config: the cache goes on a copy of it
        kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
        kwargs["generation_config"].use_cache = True
        use_cache = {}
    outputs = model.generate(*args, **cache_kwargs(model, cache), **use_cache, **kwargs)
    _check_memory_followed(cache)
    sequences = outputs if torch.is_tensor(outputs) else outputs.sequences
    if memory_write:
        prompt_length = input_ids.shape[1]
        generated = sequences[:, prompt_length:]
        # The cache rows match the returned sequences only without beams; with beams, a returned hypothesis may
        # come from a beam slot that has been reused since, so the memory is rebuilt from the sequence instead.
        beams = kwargs.get("num_beams", generation_config.num_beams) or 1
        if beams > 1 or working.batch_size != sequences.shape[0]:
            working = _rewrite(model, start, input_ids, attention_mask, generated, eos_ids)
        elif generated.shape[1] > 0:
            _write_last_token(model, cache, attention_mask, generated, eos_ids)
            working = cache.memory
    if memory is not None and memory_write:
        memory.replace_with(working)
    return outputs


def _check_memory_followed(cache: MemoryCache) -> None:
    """Raise unless every position generate() fed to the model went through a call that found the memory."""
    fed = cache.get_seq_length()
    if cache.tokens_with_memory != fed:
        raise RuntimeError(
            f"generate(memory=...) lost its memory: the model saw {fed} positions but only {cache.tokens_with_memory} "
            "of them came with the memory. The installed transformers passed the cache to the model in a way "
            "peft_deltamem does not recognise (a renamed argument?). Pin a supported transformers version (see "
            "requirements.lock) and report the versions of transformers and peft_deltamem."
        )


def _write_last_token(model, cache: MemoryCache, attention_mask, generated, eos_ids) -> None:
    """generate() never feeds its last token back; write it (unless its row had already ended)."""
    mask = torch.cat([attention_mask, _generated_mask(generated, eos_ids)], dim=1)
    last = generated[:, -1:]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)[:, -1:]
    with torch.no_grad():
        model(
            input_ids=last, attention_mask=mask, position_ids=position_ids, use_cache=True, **cache_kwargs(model, cache)
        )


def _rewrite(model, start: MemoryState, input_ids, attention_mask, generated, eos_ids) -> MemoryState:
    """Memory after writing prompt + generated tokens (up to each end of sequence) from ``start``, in one call."""
    rows_per_prompt = generated.shape[0] // input_ids.shape[0]
    rows = torch.arange(input_ids.shape[0]).repeat_interleave(rows_per_prompt)
    memory = start[rows] if not start.is_empty else MemoryState()
    full = torch.cat([input_ids[rows], generated], dim=1)
    mask = torch.cat([attention_mask[rows], _generated_mask(generated, eos_ids)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        model(input_ids=full, attention_mask=mask, position_ids=position_ids, memory=memory, use_cache=False)
    return memory
