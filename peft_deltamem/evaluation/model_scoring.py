"""Scoring answers with the model: log-probabilities of answer continuations (forced choice) and greedy answers.

(Text metrics on the answers, exact match and F1, are in :mod:`peft_deltamem.evaluation.metrics`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig

from .._compat import cache_kwargs, output_cache
from .._padding import pad_batch, pad_token_id
from ..chat.templates import common_prefix
from ._batching import model_device
from .prompts import render_prompt
from .tasks import Message

if TYPE_CHECKING:
    from ..memory.state import MemoryState


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
    start = common_prefix(ids, prompt_ids)
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
    device = model_device(model)
    ids, mask = pad_batch(prompts, pad_id, device, left=True)
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
    cont_ids, cont_mask = pad_batch([continuations[i][j][:-1] for i, j in longer], pad_id, device)
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
    device, pad = model_device(model), pad_token_id(tokenizer)
    ids, mask = pad_batch(prompts, pad, device, left=True)
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
