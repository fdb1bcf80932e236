"""PEFT's standard tuner battery for δ-mem (issue 12), on the tiny Llama, Qwen3 and Gemma3.

Saving (pickle, selected adapters, names that are prefixes of each other), loading (explicit config, device_map,
low_cpu_mem_usage), mixed-adapter batches (refused by design), ``generate`` argument forms, half precision with and
without autocast, ``inputs_embeds``, reentrant gradient checkpointing, ``torch.compile``, the base model's state dict,
deleting and disabling adapters, and the error paths.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_base_model_state_dict,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_deltamem import DeltaMemAttention, DeltaMemConfig, MemoryState
from peft_deltamem.memory.checkpointing import ExactCheckpoint
from peft_deltamem.ops import delta_rule_scan
from tests.helpers.tiny_models import random_ids, randomize_adapter, tiny_model

ARCHS = ["llama", "qwen3", "gemma3"]
ALL_HEADS = ["q", "k", "v", "o"]
HISTORY, QUESTION = random_ids(2, 9, seed=11), random_ids(2, 5, seed=12)


pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(arch: str = "qwen3", seed: int = 0, adapter_name: str = "default", **config) -> PeftModel:
    """A δ-mem model with a random (trained-looking) adapter, frozen like a loaded one, in eval mode.

    Loaded adapters are frozen, and CPU kernels may round the last bit differently when parameters require grad, so
    models that are compared bit for bit are compared in the same (frozen) mode.
    """
    config.setdefault("delta_heads", ALL_HEADS)
    model = get_peft_model(tiny_model(arch), DeltaMemConfig(task_type="CAUSAL_LM", **config), adapter_name=adapter_name)
    randomize_adapter(model, seed, scale=0.3)
    return model.requires_grad_(False).eval()


def memory_run(model, **kwargs) -> tuple[torch.Tensor, MemoryState]:
    """Write HISTORY, then read QUESTION: logits of the question and the memory after both (every adapter weight acts)."""
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=HISTORY, memory=memory, **kwargs)
        return model(input_ids=QUESTION, memory=memory, **kwargs).logits, memory


def assert_same_run(got: tuple[torch.Tensor, MemoryState], expected: tuple[torch.Tensor, MemoryState]) -> None:
    """Bit-identical logits and memory."""
    assert torch.equal(got[0], expected[0]), (got[0] - expected[0]).abs().max()
    assert got[1].states.keys() == expected[1].states.keys()
    assert all(torch.equal(got[1].states[k], v) for k, v in expected[1].states.items())


def adapter_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def cache_keyword(model) -> str:
    """The KV-cache keyword of the installed transformers (``cache`` since 5.24, ``past_key_values`` before)."""
    return (
        "cache" if "cache" in inspect.signature(type(model.get_base_model()).forward).parameters else "past_key_values"
    )


def output_cache(outputs):
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]


# ----- 1. pickle serialisation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_without_safetensors_then_from_pretrained_reproduces_logits_exactly(arch: str, tmp_path: Path) -> None:
    model = adapted(arch)
    expected = memory_run(model)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    weights = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    assert weights and all(".deltamem_" in key and ".default." not in key for key in weights)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    assert_same_run(memory_run(loaded), expected)


# ----- 2, 3. which adapters are saved; adapter names that are prefixes of each other --------------------------------
def two_adapters(first: str, second: str) -> PeftModel:
    """Adapters of different shapes (r 8 and 4) with different random weights, so any mix-up shows."""
    model = adapted("qwen3", seed=1, adapter_name=first)
    model.add_adapter(second, DeltaMemConfig(task_type="CAUSAL_LM", r=4, delta_heads=["q", "v"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{second}." in name or name.endswith(f".{second}"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.requires_grad_(False).eval()


def runs_per_adapter(model, names) -> dict[str, tuple[torch.Tensor, MemoryState]]:
    runs = {}
    for name in names:
        model.set_adapter(name)
        model.requires_grad_(False)  # set_adapter makes the active adapter trainable; compare frozen (see adapted())
        runs[name] = memory_run(model)
    return runs


def test_selected_adapters_saves_only_those(tmp_path: Path) -> None:
    model = two_adapters("default", "other")
    expected = runs_per_adapter(model, ["other"])["other"]
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    # Only "other" is written (PEFT puts a non-default adapter in a subfolder named after it); no "default" files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "other"]
    weights = load_file(tmp_path / "other" / "adapter_model.safetensors")
    other = adapter_weights(model, "other")
    assert weights.keys() == other.keys() and all(torch.equal(weights[k], v) for k, v in other.items())
    loaded = PeftModel.from_pretrained(tiny_model("qwen3"), tmp_path / "other", adapter_name="other").eval()
    assert list(loaded.peft_config) == ["other"] and loaded.peft_config["other"].r == 4
    assert_same_run(memory_run(loaded), expected)
    with pytest.raises(ValueError, match="invalid `selected_adapters`.*'default', 'other'.*'nope'"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])


@pytest.mark.parametrize("first, second", [("a", "a_b"), ("default", "default2")])
def test_adapter_names_that_prefix_each_other_stay_apart(first: str, second: str, tmp_path: Path) -> None:
    model = two_adapters(first, second)
    weights = {name: adapter_weights(model, name) for name in (first, second)}
    # Each adapter's state dict holds exactly its own weights (r 8 vs r 4: a mix-up would change shapes).
    assert {w.shape[0] for k, w in weights[first].items() if "memory_q" in k} == {8}
    assert {w.shape[0] for k, w in weights[second].items() if "memory_q" in k} == {4}
    assert not any("delta_k" in k for k in weights[second]) and any("delta_k" in k for k in weights[first])
    expected = runs_per_adapter(model, [first, second])
    assert (expected[first][0] - expected[second][0]).abs().max() > 1e-3

    model.save_pretrained(tmp_path)
    first_dir = tmp_path if first == "default" else tmp_path / first
    loaded = PeftModel.from_pretrained(tiny_model("qwen3"), first_dir, adapter_name=first)
    loaded.load_adapter(tmp_path / second, adapter_name=second)
    loaded.eval()
    got = runs_per_adapter(loaded, [second, first])
    for name in (first, second):
        assert_same_run(got[name], expected[name])
        saved = adapter_weights(loaded, name)
        assert saved.keys() == weights[name].keys() and all(torch.equal(saved[k], v) for k, v in weights[name].items())
    # Deleting the shorter name leaves the longer one whole, and the other way round.
    loaded.delete_adapter(first)
    assert list(loaded.peft_config) == [second]
    assert_same_run(runs_per_adapter(loaded, [second])[second], expected[second])
    model.delete_adapter(second)
    assert_same_run(runs_per_adapter(model, [first])[first], expected[first])


# ----- 4. from_pretrained with an explicit config --------------------------------------------------------------------
def test_from_pretrained_with_an_explicit_config(tmp_path: Path) -> None:
    model = adapted("qwen3")
    expected = memory_run(model)
    model.save_pretrained(tmp_path)
    # The explicit config is the one used: here it picks the token-by-token recurrence instead of the chunked one.
    config = DeltaMemConfig.from_pretrained(str(tmp_path))
    config.scan_impl = "recurrent"
    loaded = PeftModel.from_pretrained(tiny_model("qwen3"), tmp_path, config=config).eval()
    assert loaded.peft_config["default"] is config and config.inference_mode
    layers = [m for m in loaded.modules() if isinstance(m, DeltaMemAttention)]
    assert layers and all(m.deltamem_config["default"].scan_impl == "recurrent" for m in layers)
    assert not any(p.requires_grad for p in loaded.parameters())
    logits, memory = memory_run(loaded)
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=1e-5)  # recurrent vs chunked: float32 round-off
    for name, state in expected[1].states.items():
        torch.testing.assert_close(memory.states[name], state, rtol=0, atol=1e-5)
    # An explicit config that does not fit the saved weights is refused, not half-loaded.
    with pytest.raises(RuntimeError, match=r"size mismatch for .*deltamem_memory_q.*\[8, 64\].*\[4, 64\]"):
        PeftModel.from_pretrained(tiny_model("qwen3"), tmp_path, config=DeltaMemConfig(task_type="CAUSAL_LM", r=4))


# ----- 5. mixed-adapter batches: refused by design --------------------------------------------------------------------
def test_mixed_adapter_batches_are_refused_not_ignored() -> None:
    model = two_adapters("default", "other")
    ids = random_ids(2, 6)
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=HISTORY, memory=memory)
    before = memory.clone()
    refusal = r"δ-mem does not support mixed-adapter batches \(adapter_names=\['default', 'other'\].*set_adapter"
    with pytest.raises(ValueError, match=refusal):
        model(input_ids=ids, memory=memory, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match=refusal):
        model.generate(input_ids=ids, memory=memory, adapter_names=["default", "other"], max_new_tokens=2)
    # Rows that all name an adapter that is not the active one are refused too, not run with the active one.
    with pytest.raises(ValueError, match=r"adapter_names=\['other', 'other'\]; active adapter 'default'"):
        model(input_ids=ids, adapter_names=["other", "other"])
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(input_ids=ids, adapter_names=["__base__", "default"])
    assert all(torch.equal(memory.states[k], v) for k, v in before.states.items())
    # Every row naming the active adapter is the ordinary call.
    with torch.no_grad():
        named = model(input_ids=ids, memory=memory.clone(), adapter_names=["default", "default"]).logits
        plain = model(input_ids=ids, memory=memory.clone()).logits
        assert torch.equal(named, plain)
        tokens = model.generate(input_ids=ids, adapter_names=["default"] * 2, max_new_tokens=3, do_sample=False)
        assert torch.equal(tokens, model.generate(input_ids=ids, max_new_tokens=3, do_sample=False))


# ----- 6. generate's argument forms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_takes_the_prompt_as_input_ids_positionally_or_as_inputs(arch: str) -> None:
    model = adapted(arch)
    filled = memory_run(model)[1]
    prompt = random_ids(2, 4, seed=13)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(input_ids=prompt, **settings)
        expected_memory = filled.clone()
        expected = model.generate(input_ids=prompt, memory=expected_memory, **settings)
        assert not torch.equal(expected, plain)  # the memory matters, so a lost memory would show
        for call in (
            lambda **kw: model.generate(prompt, **kw, **settings),
            lambda **kw: model.generate(inputs=prompt, **kw, **settings),
        ):
            assert torch.equal(call(), plain)
            memory = filled.clone()
            assert torch.equal(call(memory=memory), expected)
            assert all(torch.equal(memory.states[k], v) for k, v in expected_memory.states.items())


# ----- 7. half precision ----------------------------------------------------------------------------------------------
# max |half − float32| / max |float32|: a few half-precision roundings through two tiny layers.
HALF_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_half_precision_models_keep_a_float32_memory_close_to_float32(arch, dtype, autocast) -> None:
    reference = adapted(arch)
    half = get_peft_model(tiny_model(arch, dtype=dtype), DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=ALL_HEADS))
    set_peft_model_state_dict(half, get_peft_model_state_dict(reference))  # the same adapter, float32 on both
    assert all(p.dtype == torch.float32 for n, p in half.named_parameters() if "deltamem_" in n)
    half.requires_grad_(False).eval()
    precision = torch.autocast("cpu", dtype=dtype) if autocast else contextlib.nullcontext()
    tolerance = HALF_TOLERANCE[dtype]
    expected_logits, expected_memory = memory_run(reference)
    with precision:
        logits, memory = memory_run(half)
        generated_memory = MemoryState()
        with torch.no_grad():
            sequences = half.generate(input_ids=QUESTION, memory=generated_memory, max_new_tokens=3, do_sample=False)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert relative_error(logits, expected_logits) <= tolerance
    # The generated tokens may differ from float32's; the memory must match float32 writing the same tokens.
    sequence_memory = MemoryState()
    with torch.no_grad():
        reference(input_ids=sequences, memory=sequence_memory)
    for got, expected in ((memory, expected_memory), (generated_memory, sequence_memory)):
        for name, state in got.states.items():
            assert state.dtype == torch.float32 and torch.isfinite(state).all()
            assert state.abs().sum() > 0  # written
            assert relative_error(state, expected.states[name]) <= tolerance


def test_the_recurrence_runs_in_float32_under_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 8, generator=generator) for _ in range(3))
    keep, erase, write = (torch.rand(2, 40, 8, generator=generator) for _ in range(3))
    for impl in ("recurrent", "chunked"):
        expected = delta_rule_scan(q, k, v, keep, erase, write, impl=impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reads, state = delta_rule_scan(q, k, v, keep, erase, write, impl=impl)
        assert reads.dtype == torch.float32 and state.dtype == torch.float32, impl
        assert torch.equal(reads, expected[0]) and torch.equal(state, expected[1]), impl


# ----- 8. inputs_embeds -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_embeds_equal_input_ids(arch: str) -> None:
    model = adapted(arch)
    expected = memory_run(model)
    embed = model.get_input_embeddings()
    memory = MemoryState()
    with torch.no_grad():
        model(inputs_embeds=embed(HISTORY), memory=memory)
        logits = model(inputs_embeds=embed(QUESTION), memory=memory).logits
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=1e-6)
    assert memory.states.keys() == expected[1].states.keys()
    for name, state in expected[1].states.items():
        torch.testing.assert_close(memory.states[name], state, rtol=0, atol=1e-6)


# ----- 9. gradient checkpointing, reentrant or not ---------------------------------------------------------------------
def training_step(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Write a history (gradients flowing into the memory), read it in a question, backward: adapter gradients."""
    model.zero_grad()
    memory = MemoryState()
    model(input_ids=ids[:, :7], memory=memory, memory_record_write_gates=True)
    sparsity = sum(gate.mean() for gate, _ in memory.last_write_gates.values())
    loss = model(input_ids=ids[:, 7:], labels=ids[:, 7:], memory=memory, memory_write=False).loss
    (loss + 0.1 * sparsity).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "use_reentrant, enable_first",
    [(False, False), (True, False), (True, True)],
    ids=["non-reentrant", "reentrant", "reentrant-enabled-before-adapter"],
)
def test_gradient_checkpointing_gives_the_exact_gradients(use_reentrant: bool, enable_first: bool) -> None:
    base = tiny_model("qwen3")
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
    if enable_first:
        base.gradient_checkpointing_enable(**checkpointing)
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", num_state_heads=2, delta_heads=ALL_HEADS))
    randomize_adapter(model, scale=0.1)
    model.train()
    ids = random_ids(2, 12)
    if enable_first:
        base.gradient_checkpointing_disable()
    expected = training_step(model, ids)
    # Every adapter weight gets a gradient, the write path's included (memory k/v and the write gate reach the loss
    # only through the memory the first call leaves for the second).
    assert set(expected) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("deltamem_write_gate" in n for n in expected) and all(g.abs().sum() > 0 for g in expected.values())
    model.gradient_checkpointing_enable(**checkpointing)
    assert base.model.layers[0].gradient_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use_cache=True is incompatible with gradient checkpointing"
        checkpointed = training_step(model, ids)
    assert checkpointed.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)
    # unload() gives back the base model's own checkpoint functions.
    assert isinstance(base.model.layers[0]._gradient_checkpointing_func, ExactCheckpoint)
    unloaded = model.unload()
    assert not any(
        isinstance(m.__dict__.get("_gradient_checkpointing_func"), ExactCheckpoint) for m in unloaded.modules()
    )


# ----- 10. torch.compile ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # compiling takes about a minute per graph on CPU
def test_torch_compile_matches_eager_for_a_forward_and_a_decode_step() -> None:
    model = adapted("qwen3")
    compiled = torch.compile(model)
    filled = memory_run(model)[1]
    key = cache_keyword(model)
    runs = []
    with torch.no_grad():
        for run in (model, compiled):
            memory = filled.clone()
            prefill = run(input_ids=QUESTION, memory=memory, use_cache=True)
            step_ids = prefill.logits[:, -1:].argmax(-1)
            step = run(input_ids=step_ids, memory=memory, use_cache=True, **{key: output_cache(prefill)})
            runs.append((prefill.logits, step.logits, memory))
    (eager_prefill, eager_step, eager_memory), (prefill, step, memory) = runs
    torch.testing.assert_close(prefill, eager_prefill, rtol=0, atol=1e-5)
    torch.testing.assert_close(step, eager_step, rtol=0, atol=1e-5)
    for name, state in eager_memory.states.items():
        torch.testing.assert_close(memory.states[name], state, rtol=0, atol=1e-5)
    assert any((state - filled.states[name]).abs().max() > 1e-4 for name, state in memory.states.items())


# ----- 11. device_map / low_cpu_mem_usage ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_with_device_map_and_low_cpu_mem_usage(arch: str, tmp_path: Path) -> None:
    tiny_model(arch).save_pretrained(tmp_path / "base")
    model = adapted(arch)
    expected = memory_run(model)
    model.save_pretrained(tmp_path / "adapter")
    for device_map, low_cpu_mem_usage, dispatched in [("cpu", False, False), (None, True, False), ("cpu", True, True)]:
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map)
        if dispatched:
            # As a model loaded with a device map that names the CPU: PEFT then dispatches it with accelerate hooks.
            base.hf_device_map = {"": "cpu"}
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage).eval()
        assert hasattr(loaded.get_base_model(), "_hf_hook") == dispatched
        assert all(p.device.type == "cpu" and not p.is_meta for p in loaded.parameters())
        assert_same_run(memory_run(loaded), expected)


# ----- 12. the base model's state dict ---------------------------------------------------------------------------------
def test_get_base_model_state_dict_is_the_untouched_base() -> None:
    base = tiny_model("qwen3")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(
        base, DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=ALL_HEADS, trainable_delta_scale=True)
    )
    randomize_adapter(model)
    state = get_base_model_state_dict(model)
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    adapter = get_peft_model_state_dict(model)
    assert adapter and all(".deltamem_" in k for k in adapter)
    assert len(adapter) == sum(1 for n, _ in model.named_parameters() if "deltamem_" in n)


# ----- 13. deleting adapters ------------------------------------------------------------------------------------------
def test_deleting_an_unknown_or_the_active_adapter_behaves_like_lora() -> None:
    model = two_adapters("default", "other")
    expected_other = runs_per_adapter(model, ["other"])["other"]
    model.set_adapter("default")
    with pytest.raises(ValueError, match="^Adapter nope does not exist$"):
        model.delete_adapter("nope")
    assert list(model.peft_config) == ["default", "other"]

    lora = get_peft_model(tiny_model("qwen3"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    for peft_model in (model, lora):
        with pytest.warns(
            UserWarning, match="Adapter default was active which is now deleted. Setting active adapter to other"
        ):
            peft_model.delete_adapter("default")
        assert peft_model.active_adapters == ["other"] and list(peft_model.peft_config) == ["other"]
    model.requires_grad_(False)
    assert_same_run(memory_run(model), expected_other)
    assert not any(".default." in n for n, _ in model.named_parameters())


# ----- 14. disable_adapter ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_leaving_disable_adapter_restores_the_adapter_exactly(arch: str) -> None:
    model = adapted(arch)
    before = memory_run(model)
    with model.disable_adapter():
        disabled_logits, disabled_memory = memory_run(model)
    assert disabled_memory.is_empty and (disabled_logits - before[0]).abs().max() > 1e-3
    assert_same_run(memory_run(model), before)
    with pytest.raises(KeyError), model.disable_adapter():
        raise KeyError("an error inside the block")
    assert_same_run(memory_run(model), before)


# ----- 15. error paths ------------------------------------------------------------------------------------------------
def test_two_active_adapters_are_a_clear_error() -> None:
    model = two_adapters("default", "other")
    model.base_model.set_adapter(["default", "other"])
    memory = MemoryState()
    with pytest.raises(
        ValueError, match=r"one adapter at a time; active adapters are \['default', 'other'\]\. Use set_adapter"
    ):
        model(input_ids=QUESTION, memory=memory)
    assert memory.is_empty


def test_a_layer_called_without_its_memory_context_is_a_clear_error() -> None:
    model = adapted("llama")
    layer = next(m for m in model.modules() if isinstance(m, DeltaMemAttention))
    hidden = torch.randn(1, 3, 64)
    rotary = model.get_base_model().model.rotary_emb(hidden, torch.arange(3).unsqueeze(0))
    with pytest.raises(
        RuntimeError, match="δ-mem layer 'model.layers.0.self_attn' was called without its memory context"
    ):
        layer(hidden, position_embeddings=rotary, attention_mask=None)


def test_a_call_without_input_ids_or_inputs_embeds_is_a_clear_error() -> None:
    model = adapted("llama")
    with pytest.raises(ValueError, match="^δ-mem needs input_ids or inputs_embeds to size its memory.$"):
        model(attention_mask=torch.ones(1, 4, dtype=torch.long), memory=MemoryState())
