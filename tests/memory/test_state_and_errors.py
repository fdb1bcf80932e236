"""MemoryState as an object (copy, rows, files) and every user error: one clear message, nothing changed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

import peft_deltamem.memory.state as state_module
from peft_deltamem import DeltaMemConfig, MemoryState
from tests.helpers.tiny_models import random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    peft_model = get_peft_model(tiny_model("llama"), DeltaMemConfig(task_type="CAUSAL_LM", num_state_heads=2))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "deltamem_" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return peft_model


@pytest.fixture(scope="module")
def filled(model) -> MemoryState:
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=random_ids(3, 7), memory=memory)
    return memory


def states_equal(a: MemoryState, b: MemoryState) -> bool:
    return a.states.keys() == b.states.keys() and all(torch.equal(a.states[k], b.states[k]) for k in a.states)


def test_memory_is_sized_on_first_use(filled: MemoryState) -> None:
    assert MemoryState().is_empty and len(MemoryState()) == 0
    assert filled.batch_size == 3 and len(filled.states) == 2
    assert all(s.shape == (3, 2, 8, 8) and s.dtype == torch.float32 for s in filled.states.values())
    assert "batch_size=3" in repr(filled) and repr(MemoryState()) == "MemoryState(empty)"


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.integers(0, 2), min_size=1, max_size=5))
def test_indexing_selects_and_reorders_rows(filled: MemoryState, rows: list[int]) -> None:
    picked = filled[rows]
    assert picked.batch_size == len(rows)
    for name, state in filled.states.items():
        assert torch.equal(picked.states[name], state[rows])
    assert torch.equal(filled[1].states[name], state[1:2])


def test_rows_of_a_batched_memory_continue_like_memories_of_single_rows(model, filled: MemoryState) -> None:
    question = random_ids(3, 4, seed=8)
    with torch.no_grad():
        batched = model(input_ids=question, memory=filled.clone()).logits
        for row in range(3):
            single = model(input_ids=question[row : row + 1], memory=filled[row]).logits
            torch.testing.assert_close(single[0], batched[row], rtol=1e-5, atol=1e-5)


def test_clone_detach_to_reset(filled: MemoryState) -> None:
    copy = filled.clone()
    assert states_equal(copy, filled)
    next(iter(copy.states.values())).add_(1.0)
    assert not states_equal(copy, filled)
    assert all(not s.requires_grad for s in filled.detach().states.values())
    moved = filled.to("cpu")
    assert states_equal(moved, filled) and moved.layout == filled.layout
    fresh = filled.clone().reset()
    assert fresh.is_empty and fresh.states == {}


def test_save_and_load_round_trip(filled: MemoryState, tmp_path) -> None:
    path = tmp_path / "memory.safetensors"
    filled.save(path)
    loaded = MemoryState.load(path)
    assert states_equal(loaded, filled)
    assert loaded.layout == filled.layout
    assert loaded.adapter_config["r"] == 8 and loaded.adapter_config["peft_type"] == "DELTAMEM"
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed into place


def test_a_failed_save_keeps_the_previous_file(filled: MemoryState, tmp_path, monkeypatch) -> None:
    path = tmp_path / "memory.safetensors"
    filled.save(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        filled.clone().save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_memory"])
def test_corrupt_or_foreign_memory_files_give_a_clear_error(filled: MemoryState, tmp_path, damage: str) -> None:
    path = tmp_path / "memory.safetensors"
    filled.save(path)
    if damage == "garbage":
        path.write_bytes(b"\x00\x01not safetensors at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="memory"):
        MemoryState.load(path)


def test_empty_memory_cannot_be_saved(tmp_path) -> None:
    with pytest.raises(ValueError, match="empty MemoryState"):
        MemoryState().save(tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_memory_of_another_adapter_or_batch_size_is_refused_unchanged(model, filled: MemoryState) -> None:
    before = filled.clone()
    with pytest.raises(ValueError, match="batch of 2.*mem\\[indices\\]"):
        model(input_ids=random_ids(2, 4), memory=filled)
    assert states_equal(filled, before)
    other = get_peft_model(tiny_model("llama"), DeltaMemConfig(task_type="CAUSAL_LM", r=4))
    with pytest.raises(ValueError, match="num_state_heads=2.*r=4.*fresh MemoryState"):
        other(input_ids=random_ids(3, 4), memory=filled)
    assert states_equal(filled, before)
    with pytest.raises(TypeError, match="MemoryState"):
        model(input_ids=random_ids(3, 4), memory={"not": "a memory"})


def test_a_4d_attention_mask_is_refused(model) -> None:
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=random_ids(1, 4), attention_mask=torch.ones(1, 1, 4, 4), memory=MemoryState())


@pytest.mark.parametrize(
    "field,value",
    [
        ("r", 0),
        ("r", 2.5),
        ("alpha", -1),
        ("num_state_heads", 0),
        ("delta_heads", ["q", "x"]),
        ("delta_heads", []),
        ("write_granularity", "word"),
        ("state_update_mode", "sideways"),
        ("init_delta_heads", "ones"),
        ("scan_impl", "magic"),
        ("delta_scale_granularity", "token"),
        ("rankwise_gates", "yes"),
        ("base_slice_width", 0),
        ("online_gain", -0.1),
        ("delta_scale_init", 5.0),
    ],
)
def test_invalid_config_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"DeltaMemConfig.{field}"):
        DeltaMemConfig(**{field: value})


def test_unknown_or_wrong_target_modules_are_clear_errors() -> None:
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="nonexistent"):
        get_peft_model(base, DeltaMemConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="q_proj', 'k_proj', 'v_proj', 'o_proj'.*target_modules"):
        get_peft_model(tiny_model("llama"), DeltaMemConfig(target_modules=["q_proj"]))


def test_an_architecture_without_qkvo_projections_is_refused_unchanged() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="found no attention module in GPT2LMHeadModel.*q_proj"):
        get_peft_model(base, DeltaMemConfig())
    assert [n for n, _ in base.named_modules()] == names
