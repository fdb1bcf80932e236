"""The PEFT method: exact base reproduction, memory semantics across calls and padding, gradients, dtypes."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemAttention, DeltaMemConfig, MemoryState
from peft_deltamem._compat import cache_kwargs, output_cache
from peft_deltamem.config import DELTA_HEAD_INITS
from tests.helpers.tiny_models import ARCHITECTURES, qwen3_4b_on_meta, random_ids, randomize_adapter, tiny_model

ALL_HEADS = dict(delta_heads=["q", "k", "v", "o"])


def adapted(arch: str = "llama", seed: int = 0, **config):
    base = tiny_model(arch, seed=seed)
    return get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", **config))


# ----- the adapter is invisible until it has something to read -----------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("init", DELTA_HEAD_INITS)
def test_fresh_adapter_reading_empty_memory_is_the_base_model(arch: str, init: str) -> None:
    base = tiny_model(arch)
    ids = random_ids(2, 9)
    expected = base(ids).logits
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", init_delta_heads=init, **ALL_HEADS))
    # Read-only from an empty memory: every read is S_0 q = 0, whatever the correction heads hold.
    got = model(input_ids=ids, memory_write=False).logits
    assert (got - expected).abs().max().item() <= 1e-6
    # A single token reads S_0 = 0 before its write, so it is also untouched.
    got_one = model(input_ids=ids[:, :1]).logits
    assert (got_one - base(ids[:, :1]).logits).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_zero_init_adapter_is_the_base_model_even_while_writing(arch: str) -> None:
    base = tiny_model(arch)
    ids = random_ids(2, 9)
    expected = base(ids).logits
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", init_delta_heads="zero", **ALL_HEADS))
    memory = MemoryState()
    got = model(input_ids=ids, memory=memory).logits
    assert (got - expected).abs().max().item() <= 1e-6
    # ...while the memory itself did fill up (the writes are real, only the read-out starts at zero).
    assert all(state.abs().sum() > 0 for state in memory.states.values())


def test_token_writes_within_a_call_change_later_tokens_only() -> None:
    base = tiny_model("llama")
    ids = random_ids(1, 8)
    expected = base(ids).logits
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM"))
    got = model(input_ids=ids).logits
    # Token 0 reads the empty memory; later tokens read what earlier tokens wrote (base_slice_fixed init ≠ 0).
    assert (got[:, 0] - expected[:, 0]).abs().max().item() <= 1e-6
    assert (got[:, 1:] - expected[:, 1:]).abs().max().item() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_disable_adapter_and_unload_give_the_exact_base_model(arch: str) -> None:
    base = tiny_model(arch)
    ids = random_ids(2, 7)
    expected = base(ids).logits.clone()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", **ALL_HEADS))
    randomize_adapter(model)
    memory = MemoryState()
    assert (model(input_ids=ids, memory=memory).logits - expected).abs().max() > 1e-3
    with model.disable_adapter():
        disabled_memory = MemoryState()
        assert torch.equal(model(input_ids=ids, memory=disabled_memory).logits, expected)
        assert disabled_memory.is_empty
    unloaded = model.unload()
    assert not any(isinstance(m, DeltaMemAttention) for m in unloaded.modules())
    assert torch.equal(unloaded(ids).logits, expected)
    assert set(unloaded.state_dict()) == set(base_state)
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in base_state.items())
    # The memory hooks are gone with the adapter: a stray memory= is no longer consumed.
    assert not unloaded._forward_pre_hooks


def test_merge_and_unload_raises_a_clear_error_and_changes_nothing() -> None:
    model = adapted()
    with pytest.raises(ValueError, match="cannot be merged.*unload"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert sum(isinstance(m, DeltaMemAttention) for m in model.modules()) == 2


# ----- memory semantics ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,heads", [("llama", 1), ("qwen3", 1), ("llama", 4), ("gemma3", 2)])
def test_two_calls_with_memory_and_cache_equal_one_call(arch: str, heads: int) -> None:
    model = adapted(arch, num_state_heads=heads, **ALL_HEADS)
    randomize_adapter(model)
    ids = random_ids(2, 12)
    whole_memory = MemoryState()
    whole = model(input_ids=ids, memory=whole_memory, use_cache=True).logits

    split_memory = MemoryState()
    first = model(input_ids=ids[:, :5], memory=split_memory, use_cache=True)
    second = model(
        input_ids=ids[:, 5:], memory=split_memory, use_cache=True, **cache_kwargs(model, output_cache(first))
    )
    split = torch.cat([first.logits, second.logits], dim=1)
    assert (split - whole).abs().max().item() <= 1e-5
    for name, state in whole_memory.states.items():
        assert (split_memory.states[name] - state).abs().max().item() <= 1e-5


def test_memory_carries_information_between_calls() -> None:
    model = adapted(**ALL_HEADS)
    randomize_adapter(model)
    history, question = random_ids(1, 10, seed=3), random_ids(1, 4, seed=4)
    memory = MemoryState()
    model(input_ids=history, memory=memory)
    with_memory = model(input_ids=question, memory=memory.clone()).logits
    without = model(input_ids=question).logits
    assert (with_memory - without).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_padding_is_never_written_and_rows_do_not_interact(arch: str) -> None:
    model = adapted(arch, num_state_heads=2, **ALL_HEADS)
    randomize_adapter(model)
    short, long = random_ids(1, 5, seed=5), random_ids(1, 8, seed=6)
    alone = {}
    for name, row in (("short", short), ("long", long)):
        memory = MemoryState()
        alone[name] = (model(input_ids=row, memory=memory).logits, memory)

    for side in ("left", "right"):
        pad = torch.zeros(1, 3, dtype=torch.long)
        padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, :3] = 0 if side == "left" else 1
        mask[0, 5:] = 0 if side == "right" else 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        memory = MemoryState()
        logits = model(
            input_ids=torch.cat([padded, long]), attention_mask=mask, position_ids=positions, memory=memory
        ).logits
        real = mask[0].bool()
        assert (logits[0, real] - alone["short"][0][0]).abs().max().item() <= 1e-5
        assert (logits[1] - alone["long"][0][0]).abs().max().item() <= 1e-5
        for layer, state in memory.states.items():
            # Round-off only (hidden states of a padded batch differ at 1e-6); a written pad would differ by O(0.1).
            torch.testing.assert_close(state[0], alone["short"][1].states[layer][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(state[1], alone["long"][1].states[layer][0], rtol=1e-4, atol=1e-5)


def test_read_only_calls_leave_the_memory_bit_identical() -> None:
    model = adapted(**ALL_HEADS)
    randomize_adapter(model)
    memory = MemoryState()
    model(input_ids=random_ids(2, 6), memory=memory)
    before = {k: v.clone() for k, v in memory.states.items()}
    read = model(input_ids=random_ids(2, 5, seed=9), memory=memory, memory_write=False).logits
    assert all(torch.equal(memory.states[k], v) for k, v in before.items())
    assert (read - model(input_ids=random_ids(2, 5, seed=9), memory_write=False).logits).abs().max() > 1e-4


def test_calls_without_memory_are_stateless() -> None:
    model = adapted(**ALL_HEADS)
    randomize_adapter(model)
    ids = random_ids(2, 6)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


# ----- gradients and dtypes ----------------------------------------------------------------------------------------
def _adapter_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    memory = MemoryState()
    model(input_ids=ids[:, :6], memory=memory)
    loss = model(input_ids=ids[:, 6:], labels=ids[:, 6:], memory=memory, memory_write=False).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_only_adapter_parameters_get_gradients_and_checkpointing_keeps_them_exact() -> None:
    model = adapted(num_state_heads=2, **ALL_HEADS)
    randomize_adapter(model, scale=0.1)
    model.train()
    ids = random_ids(2, 12)
    grads = _adapter_grads(model, ids)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable
    assert trainable and all("deltamem_" in n for n in trainable)
    # Every adapter weight, the write path (memory q/k/v, gate) included, receives a non-zero gradient.
    assert all(g.abs().sum() > 0 for g in grads.values())

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.base_model.model.model.layers[0].gradient_checkpointing
    checkpointed = _adapter_grads(model, ids)
    assert set(checkpointed) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_bf16_model_with_bf16_adapter_keeps_a_float32_memory() -> None:
    base = tiny_model("qwen3", dtype=torch.bfloat16)
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM"), autocast_adapter_dtype=False)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "deltamem_" in n)
    memory = MemoryState()
    logits = model(input_ids=random_ids(2, 6), memory=memory).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert all(state.dtype == torch.float32 for state in memory.states.values())
    # The default (autocast_adapter_dtype=True) keeps adapter weights in float32 on a bf16 model.
    default = get_peft_model(tiny_model("qwen3", dtype=torch.bfloat16), DeltaMemConfig(task_type="CAUSAL_LM"))
    assert all(p.dtype == torch.float32 for n, p in default.named_parameters() if "deltamem_" in n)
    assert torch.isfinite(default(input_ids=random_ids(2, 6)).logits.float()).all()


def test_qwen3_4b_geometry_has_the_published_parameter_count() -> None:
    base = qwen3_4b_on_meta()
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", r=8, delta_heads=["q", "o"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 4_866_336
    assert 0.11 < 100 * trainable / (total - trainable) < 0.13
