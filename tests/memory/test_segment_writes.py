"""Message / sentence writes (SSW): one write per segment from the mean hidden state; reads see the pre-call memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem._compat import cache_kwargs, output_cache
from tests.helpers.tiny_models import random_ids, tiny_model

# Two rows; ids -1 are not written (e.g. a system prompt), messages 0..2, row 1 is left-padded.
SEGMENTS = torch.tensor(
    [
        [-1, -1, 0, 0, 0, 1, 1, 2, 2, 2],
        [-1, 0, 0, 0, 0, 0, 2, 2, 2, 2],
    ]
)
MASK = torch.tensor([[1] * 10, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])


def ssw_model(init: str = "base_slice_fixed", **config):
    model = get_peft_model(
        tiny_model("qwen3", seed=4),
        DeltaMemConfig(task_type="CAUSAL_LM", write_granularity="message", init_delta_heads=init, **config),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random memory projections and gates; the correction heads keep their init ("zero" switches them off).
            if "deltamem_memory_" in name or "deltamem_write_gate" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def reference_memory(model, ids, segments, mask) -> dict[str, torch.Tensor]:
    """docs/design.md §1 by hand: the reads of an empty memory are 0, so the attention inputs are the base model's; per
    message (ids in order) take the mean input over its valid tokens and apply the gated delta rule once."""
    inputs = {}
    handles = [
        layer.base_layer.register_forward_pre_hook(
            lambda mod, args, kwargs, key=key: inputs.__setitem__(key, kwargs["hidden_states"]), with_kwargs=True
        )
        for key, layer in ((n.removeprefix("base_model.model."), m) for n, m in model.named_modules())
        if hasattr(layer, "memory_key")
    ]
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    expected = {}
    for name, module in model.named_modules():
        if not hasattr(module, "memory_key"):
            continue
        h = inputs[name.removeprefix("base_model.model.")]
        w_k = module.deltamem_memory_k["default"].weight
        w_v = module.deltamem_memory_v["default"].weight
        gate = module.deltamem_write_gate["default"]
        states = []
        for row in range(ids.shape[0]):
            state = torch.zeros(8, 8)
            for message in sorted({int(i) for i in segments[row] if i >= 0}):
                chosen = (segments[row] == message) & mask[row].bool()
                mean = h[row, chosen].mean(0)
                key = F.normalize(torch.tanh(w_k @ mean), dim=0)
                value = w_v @ mean
                beta = torch.sigmoid(gate.weight @ mean + gate.bias)
                state = (
                    (1 - beta)[:, None] * state - (beta * (state @ key))[:, None] * key + (beta * value)[:, None] * key
                )
            states.append(state)
        expected[module.memory_key] = torch.stack(states).unsqueeze(1)
    return expected


def test_one_write_per_message_from_the_mean_hidden_state() -> None:
    model = ssw_model()
    ids = random_ids(2, 10, seed=40)
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=MASK, memory=memory, memory_segment_ids=SEGMENTS)
    expected = reference_memory(model, ids, SEGMENTS, MASK)
    for layer, state in expected.items():
        torch.testing.assert_close(memory.states[layer], state, rtol=1e-4, atol=1e-5)


def test_a_token_granularity_adapter_writes_differently() -> None:
    """Guards the reference above: token writes of the same weights give another memory."""
    ids = random_ids(2, 10, seed=40)
    ssw = ssw_model()
    tsw = get_peft_model(tiny_model("qwen3", seed=4), DeltaMemConfig(task_type="CAUSAL_LM"))
    tsw.load_state_dict(ssw.state_dict())
    memory = MemoryState()
    with torch.no_grad():
        tsw(input_ids=ids, attention_mask=MASK, memory=memory)
    expected = reference_memory(ssw, ids, SEGMENTS, MASK)
    assert any((memory.states[k] - v).abs().max() > 1e-3 for k, v in expected.items())


def test_token_reads_see_the_memory_from_before_the_call() -> None:
    model = ssw_model()
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=random_ids(2, 10, seed=41), attention_mask=MASK, memory=memory, memory_segment_ids=SEGMENTS)
        ids = random_ids(2, 10, seed=42)
        read_only = model(input_ids=ids, attention_mask=MASK, memory=memory.clone(), memory_write=False).logits
        writing = model(input_ids=ids, attention_mask=MASK, memory=memory, memory_segment_ids=SEGMENTS).logits
    torch.testing.assert_close(writing, read_only, rtol=0, atol=1e-6)


def test_without_ids_the_call_is_one_segment() -> None:
    model = ssw_model()
    ids = random_ids(2, 10, seed=43)
    one_segment = torch.where(MASK.bool(), 0, -1)
    implicit, explicit = MemoryState(), MemoryState()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=MASK, memory=implicit)
        model(input_ids=ids, attention_mask=MASK, memory=explicit, memory_segment_ids=one_segment)
    assert all(torch.equal(implicit.states[k], explicit.states[k]) for k in implicit.states)


@pytest.mark.parametrize("heads", [1, 2])
def test_calls_split_at_message_boundaries_write_each_message_once(heads: int) -> None:
    """With corrections off (zero heads) hidden states do not depend on the memory, so writing messages 0-1 in one call
    and message 2 in a second call (with the KV cache) must give exactly the one-call memory."""
    model = ssw_model(init="zero", num_state_heads=heads)
    ids = random_ids(2, 10, seed=44)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2, 2]] * 2)
    whole, split = MemoryState(), MemoryState()
    with torch.no_grad():
        model(input_ids=ids, memory=whole, memory_segment_ids=segments)
        first = model(input_ids=ids[:, :6], memory=split, memory_segment_ids=segments[:, :6], use_cache=True)
        model(
            input_ids=ids[:, 6:],
            memory=split,
            memory_segment_ids=segments[:, 6:],
            use_cache=True,
            **cache_kwargs(model, output_cache(first)),
        )
    for layer, state in whole.states.items():
        torch.testing.assert_close(split.states[layer], state, rtol=1e-4, atol=1e-6)


def test_segment_ids_of_the_wrong_shape_are_refused() -> None:
    model = ssw_model()
    with pytest.raises(ValueError, match="memory_segment_ids must have one id per input token"):
        model(input_ids=random_ids(2, 10), memory=MemoryState(), memory_segment_ids=SEGMENTS[:, :5])
