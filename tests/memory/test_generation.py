"""generate(memory=...): equals a manual token loop, keeps batch rows independent, follows beams, stops at EOS."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from peft import get_peft_model
from transformers import DynamicCache

import peft_deltamem.memory.hooks as context_module
from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem._compat import CACHE_KEYWORDS, cache_keyword
from peft_deltamem.memory.generation import MemoryCache
from tests.helpers.tiny_models import random_ids, randomize_adapter, tiny_model

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model():
    peft_model = get_peft_model(
        tiny_model("llama", seed=3), DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=["q", "k", "v", "o"])
    )
    randomize_adapter(peft_model)
    return peft_model.eval()


def filled_memory(model, seed: int) -> MemoryState:
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=random_ids(1, 10, seed=seed), memory=memory)
    return memory


def assert_same_memory(a: MemoryState, b: MemoryState, atol: float = 1e-5) -> None:
    assert a.states.keys() == b.states.keys()
    for name in a.states:
        torch.testing.assert_close(a.states[name], b.states[name], rtol=1e-4, atol=atol)


def greedy(model, ids, memory, **kwargs):
    return model.generate(
        input_ids=ids, memory=memory, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs
    )


def accepted_cache_keywords(model) -> list[str]:
    """The cache keywords the installed transformers accepts: its own, and the old one while it is deprecated."""
    return sorted({cache_keyword(model), "past_key_values"})


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("spelling", CACHE_KEYWORDS)
def test_greedy_generate_equals_a_manual_token_loop(model, spelling: str) -> None:
    if spelling not in accepted_cache_keywords(model):
        pytest.skip(f"transformers {transformers.__version__} does not take {spelling}=")
    prompt = random_ids(1, 5, seed=20)
    memory = filled_memory(model, seed=21)
    manual_memory = memory.clone()
    sequences = greedy(model, prompt, memory, eos_token_id=None)

    cache, tokens, feed = DynamicCache(), prompt, prompt
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            out = model(input_ids=feed, memory=manual_memory, use_cache=True, **{spelling: cache})
            feed = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, feed], dim=1)
        model(input_ids=feed, memory=manual_memory, use_cache=True, **{spelling: cache})  # the last token too
    assert cache.get_seq_length() == tokens.shape[1]  # the KV cache was really used under this spelling
    assert torch.equal(sequences, tokens)
    assert_same_memory(memory, manual_memory)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["cache", "past_key_values", "positional"])
def test_a_memory_cache_is_found_under_any_name_or_position(model, how: str) -> None:
    """A MemoryCache passed to the model under either keyword, or in the cache's positional slot, carries its memory
    exactly as memory= does."""
    ids = random_ids(1, 6, seed=27)
    expected = MemoryState()
    with torch.no_grad():
        expected_logits = model(input_ids=ids, memory=expected).logits
    base = model.get_base_model()
    cache = MemoryCache(MemoryState(), config=base.config)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if how == "positional":
            slot = list(inspect.signature(type(base).forward).parameters).index(cache_keyword(base)) - 1
            args = [ids, mask, None, None][:slot] + [cache]
            logits = base(*args, use_cache=True).logits
        else:
            logits = base(input_ids=ids, attention_mask=mask, use_cache=True, **{how: cache}).logits
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
    assert_same_memory(cache.memory, expected, atol=1e-6)


def test_our_own_calls_use_the_cache_name_transformers_expects(model) -> None:
    """generate(memory=...) passes the cache under the installed model's own keyword: no deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        greedy(model, random_ids(1, 4, seed=28), filled_memory(model, seed=29))


def test_a_generation_config_is_honoured_without_deprecated_extra_arguments(model, monkeypatch) -> None:
    """With a caller's generation_config, the cache setting goes on a copy of it, not beside it (transformers
    deprecates generation arguments next to a config); the caller's config is untouched, the tokens the same."""
    logged: list[str] = []
    monkeypatch.setattr(
        transformers.generation.utils.logger, "warning_once", lambda message, *a, **k: logged.append(message)
    )
    ids = random_ids(1, 4, seed=32)
    config = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, use_cache=False)
    with_config = model.generate(input_ids=ids, memory=filled_memory(model, seed=33), generation_config=config)
    assert not [m for m in logged if "together with generation-related" in m], logged
    assert config.use_cache is False
    torch.testing.assert_close(with_config, greedy(model, ids, filled_memory(model, seed=33)), rtol=0, atol=0)


def test_generation_that_loses_its_memory_raises(model, monkeypatch) -> None:
    """The failure of transformers 5.24 (the hook no longer found the cache, every step ran on a throwaway empty
    memory) must be loud: simulate a hook that cannot find the cache."""
    monkeypatch.setattr(context_module, "_memory_cache", lambda args, kwargs: None)
    memory = filled_memory(model, seed=30)
    before = memory.clone()
    with pytest.raises(RuntimeError, match="lost its memory"):
        greedy(model, random_ids(1, 4, seed=31), memory)
    assert_same_memory(memory, before, atol=0)  # nothing changed


def test_a_memory_that_never_reaches_a_layer_raises() -> None:
    """A model that skips an adapted layer (here: its last decoder layer removed after wrapping) loses that layer's
    reads and writes: the call raises instead of returning a memory with a stale layer."""
    peft_model = get_peft_model(tiny_model("llama", seed=4), DeltaMemConfig(task_type="CAUSAL_LM"))
    memory = MemoryState()
    peft_model(input_ids=random_ids(1, 4), memory=memory)
    decoder = peft_model.get_base_model().model
    decoder.layers = decoder.layers[:-1]
    decoder.config.num_hidden_layers -= 1
    before = memory.clone()
    with pytest.raises(RuntimeError, match="never reached 1 of 2 adapted layers"):
        peft_model(input_ids=random_ids(1, 4), memory=memory)
    assert_same_memory(memory, before, atol=0)


def test_the_memory_holds_prompt_and_generated_tokens_once(model) -> None:
    prompt = random_ids(2, 5, seed=22)
    memory = MemoryState.cat([filled_memory(model, 23), filled_memory(model, 24)])
    start = memory.clone()
    torch.manual_seed(0)
    sequences = model.generate(
        input_ids=prompt, memory=memory, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=5, eos_token_id=None
    )
    with torch.no_grad():
        model(input_ids=sequences, memory=start)  # write everything in one call
    assert_same_memory(memory, start)


def test_read_only_generation_leaves_the_memory_bit_identical(model) -> None:
    memory = filled_memory(model, 25)
    before = memory.clone()
    reading = greedy(model, random_ids(1, 5, seed=26), memory, memory_write=False)
    assert all(torch.equal(memory.states[k], before.states[k]) for k in before.states)
    blank = greedy(model, random_ids(1, 5, seed=26), MemoryState(), memory_write=False)
    assert not torch.equal(reading, blank)  # the memory was really read


@pytest.mark.parametrize("beams", [1, 3])
def test_rows_with_different_memories_and_left_padding_generate_as_alone(model, beams: int) -> None:
    prompts = [random_ids(1, 4, seed=27), random_ids(1, 7, seed=28)]
    memories = [filled_memory(model, 29), filled_memory(model, 30)]
    alone = []
    for prompt, memory in zip(prompts, memories, strict=True):
        row_memory = memory.clone()
        out = greedy(model, prompt, row_memory, num_beams=beams, eos_token_id=None)
        alone.append((out[0, prompt.shape[1] :], row_memory))

    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[1] :] = prompt[0]
        mask[row, width - prompt.shape[1] :] = 1
    batch_memory = MemoryState.cat(m.clone() for m in memories)
    out = greedy(model, ids, batch_memory, attention_mask=mask, num_beams=beams, eos_token_id=None)
    for row, (generated, row_memory) in enumerate(alone):
        assert torch.equal(out[row, width:], generated)
        assert_same_memory(batch_memory[row], row_memory)


def test_tokens_after_the_end_of_a_sequence_are_not_written(model) -> None:
    prompts = random_ids(2, 5, seed=31)
    free_run = greedy(model, prompts, MemoryState(), eos_token_id=None)
    generated = free_run[:, 5:]
    # Make row 0's second generated token the end-of-sequence token (one row 1 never produces).
    eos = int(generated[0, 1])
    if (generated[1] == eos).any():
        pytest.skip("row 1 produces the chosen token too; pick other seeds")
    memory = MemoryState()
    out = greedy(model, prompts, memory, eos_token_id=eos)
    assert torch.equal(out[0, 5:7], generated[0, :2]) and (out[0, 7:] == 0).all()
    # Row 0's memory: its prompt and two generated tokens (the EOS included), nothing after.
    reference = MemoryState()
    with torch.no_grad():
        model(input_ids=out[:1, :7], memory=reference)
    assert_same_memory(memory[0], reference)
    reference_long = MemoryState()
    with torch.no_grad():
        model(input_ids=out[1:], memory=reference_long)
    assert_same_memory(memory[1], reference_long)


def test_generate_without_memory_uses_a_temporary_one(model) -> None:
    prompt = random_ids(1, 5, seed=32)
    assert torch.equal(greedy(model, prompt, None), greedy(model, prompt, MemoryState()))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("spelling", CACHE_KEYWORDS)
def test_passing_a_cache_and_a_memory_is_refused(model, spelling: str) -> None:
    with pytest.raises(ValueError, match="MemoryCache"):
        greedy(model, random_ids(1, 3), MemoryState(), **{spelling: DynamicCache()})


@pytest.mark.parametrize("beams", [1, 3])
def test_decoding_with_the_cached_memory_equals_recomputing_everything_each_step(model, beams: int) -> None:
    """An independent reference: transformers' own generate without KV cache and without memory= recomputes the
    whole sequence from an empty memory at every step, which is exactly what the cached memory must reproduce,
    beam reordering included."""
    prompt = random_ids(2, 5, seed=33)
    ours = greedy(model, prompt, MemoryState(), num_beams=beams, eos_token_id=None)
    reference = model.base_model.model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=beams,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(ours, reference)


def test_generate_with_the_adapter_disabled_is_the_base_model_and_leaves_the_memory(model) -> None:
    prompt = random_ids(1, 5, seed=34)
    memory = filled_memory(model, seed=35)
    before = memory.clone()
    with model.disable_adapter():
        ours = greedy(model, prompt, memory, eos_token_id=None)
    base = model.get_base_model()
    with model.disable_adapter():
        reference = base.generate(
            input_ids=prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert torch.equal(ours, reference)
    assert_same_memory(memory, before, atol=0)
