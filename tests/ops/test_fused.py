"""The fused decode step (peft_deltamem.ops.fused) computes what the eager path computes, and is used only where it
applies. Building the C++ extension takes about a minute the first time (then torch caches it): marked slow."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem.ops import fused
from tests.helpers.tiny_models import random_ids, randomize_adapter, tiny_model

pytestmark = pytest.mark.slow

CONFIGS = {
    "defaults": {},
    "msw, all heads": {"num_state_heads": 4, "delta_heads": ["q", "k", "v", "o"]},
    "separate keep gate, lambda outside": {"couple_lambda": False, "state_update_mode": "lambda_outside", "r": 4},
    "no lambda, shared gates": {"state_update_mode": "no_lambda", "rankwise_gates": False},
    "raw q/k, r 16, two heads, keep gate": {
        "normalize_qk": False,
        "r": 16,
        "num_state_heads": 2,
        "couple_lambda": False,
        "delta_heads": ["v"],
    },
}


@pytest.fixture(scope="module")
def built() -> None:
    fused.enable_fused_decode()
    fused.disable_fused_decode()


@pytest.fixture
def fused_on(built):
    fused.enable_fused_decode()
    yield
    fused.disable_fused_decode()


def adapted(**config) -> torch.nn.Module:
    model = get_peft_model(tiny_model("llama", seed=5), DeltaMemConfig(task_type="CAUSAL_LM", **config))
    # Raw (unnormalised) keys make the state grow without bound under large random weights: keep them small.
    randomize_adapter(model, seed=2, scale=0.5 if config.get("normalize_qk", True) else 0.05)
    return model.eval()


def decode(model, prompt: torch.Tensor, steps: int, write: bool = True):
    """Prefill (written) then ``steps`` one-token calls with the cache, written or only read: (logits of every step,
    the memory after)."""
    from transformers import DynamicCache

    from peft_deltamem._compat import cache_kwargs

    memory, cache = MemoryState(), cache_kwargs(model, DynamicCache())
    logits = []
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, memory=memory, **cache)
        for _ in range(steps):
            feed = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=feed, use_cache=True, memory=memory, memory_write=write, **cache)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), memory


def decode_fused(model, prompt: torch.Tensor, steps: int, write: bool = True):
    """:func:`decode` with the fused step on: (logits, memory, what each fused call returned)."""
    returned = []
    original = fused.decode_step
    try:
        fused.enable_fused_decode()
        fused.decode_step = lambda *a, **k: returned.append(original(*a, **k)) or returned[-1]
        return (*decode(model, prompt, steps, write), returned)
    finally:
        fused.decode_step = original
        fused.disable_fused_decode()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_decoding_equals_eager_decoding(name: str, built) -> None:
    model = adapted(**CONFIGS[name])
    prompt = random_ids(3, 7, seed=4)
    eager_logits, eager_memory = decode(model, prompt, steps=5)
    fused_logits, fused_memory, returned = decode_fused(model, prompt, steps=5)
    adapted_layers = len(eager_memory.states)
    assert len(returned) == 5 * adapted_layers and all(
        returned
    )  # every decode step of every layer, and nothing else (not the prefill)
    torch.testing.assert_close(fused_logits, eager_logits, atol=1e-5, rtol=1e-5)
    for key, state in eager_memory.states.items():  # float32 round-off, relative to the state's scale
        torch.testing.assert_close(fused_memory.states[key], state, atol=1e-5 * state.abs().max(), rtol=1e-5)
    assert fused_memory.states[key].abs().max() > 0.1  # the memory was written: the comparison can fail


@pytest.mark.parametrize("name", ["defaults", "msw, all heads", "message writes"])
def test_fused_read_only_decoding_equals_eager_and_leaves_the_memory(name: str, built) -> None:
    """Decoding that only reads (``memory_write=False``, as the server and the evaluation decode) takes the fused
    step too, also for an adapter that writes whole messages, and leaves the memory as the prefill wrote it."""
    model = adapted(**{**CONFIGS, "message writes": {"write_granularity": "message"}}[name])
    prompt = random_ids(2, 6, seed=8)
    eager_logits, eager_memory = decode(model, prompt, steps=4, write=False)
    fused_logits, fused_memory, returned = decode_fused(model, prompt, steps=4, write=False)
    assert len(returned) == 4 * len(eager_memory.states) and all(returned)
    torch.testing.assert_close(fused_logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(fused_memory.states[k], v) for k, v in eager_memory.states.items())  # the prefill's


def test_a_padded_row_reads_nothing_and_keeps_its_memory(built) -> None:
    """A row whose new token is masked (attention mask 0) must leave its state bit-identical, as the eager path
    does; the valid row is written, the same as eagerly."""
    model = adapted()
    prefilled = MemoryState()
    with torch.no_grad():
        model(input_ids=random_ids(2, 6, seed=1), memory=prefilled)
    token, mask = random_ids(2, 1, seed=7), torch.tensor([[1], [0]])
    after = {}
    for on in (True, False):
        memory = prefilled.clone()
        (fused.enable_fused_decode if on else fused.disable_fused_decode)()
        try:
            with torch.no_grad():
                model(input_ids=token, attention_mask=mask, memory=memory)
        finally:
            fused.disable_fused_decode()
        after[on] = memory.states
    for key, before in prefilled.states.items():
        assert torch.equal(after[True][key][1], before[1])  # masked row: untouched
        assert (after[True][key][0] - before[0]).abs().max() > 1e-3  # valid row: written
        torch.testing.assert_close(after[True][key], after[False][key], atol=1e-5 * before.abs().max(), rtol=1e-5)


def test_steps_that_need_gradients_take_the_eager_path(fused_on, monkeypatch) -> None:
    model = adapted()
    monkeypatch.setattr(fused, "decode_step", lambda *a, **k: pytest.fail("the fused step has no backward"))
    out = model(input_ids=random_ids(1, 1), memory=MemoryState())
    out.logits.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "deltamem_memory_q" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize(
    ("op", "asked", "what"),
    [("_DECODE", "fused_decode_enabled", "the fused decode step"), ("_SCAN", "fused_scan_enabled", "the fused scan")],
)
def test_the_environment_switch_fails_loudly_when_the_build_fails(monkeypatch, op: str, asked: str, what: str) -> None:
    native = getattr(fused, op)
    monkeypatch.setenv(native.flag, "1")
    monkeypatch.setattr(native, "environment_read", False)
    monkeypatch.setattr(native, "extension", None)
    monkeypatch.setattr(native, "enabled", False)
    monkeypatch.setattr(native, "source", native.source.with_name("missing.cpp"))
    with pytest.raises(RuntimeError, match=f"could not build {what}.*leave it off \\({native.flag} unset\\)"):
        getattr(fused, asked)()
    assert not native.enabled


def test_adapter_weights_that_are_not_float32_take_the_eager_path(built) -> None:
    """Float64 adapter weights on a float32 model: the fused step declines (it changes nothing) and decoding equals
    the eager path's exactly."""
    model = adapted()
    for name, param in model.named_parameters():
        if "deltamem_" in name:
            param.data = param.data.double()
    prompt = random_ids(2, 5, seed=6)
    eager_logits, eager_memory = decode(model, prompt, steps=3)
    fused_logits, fused_memory, returned = decode_fused(model, prompt, steps=3)
    assert returned and all(len(r) == 0 for r in returned)  # asked at every step, declined every time
    assert torch.equal(fused_logits, eager_logits)
    assert all(torch.equal(fused_memory.states[k], v) for k, v in eager_memory.states.items())
