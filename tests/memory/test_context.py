"""The model-level hook finds the δ-mem layers from a cached list; the cache follows adapters added later and copies."""

from __future__ import annotations

import copy

import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemAttention, DeltaMemConfig, MemoryState
from peft_deltamem.memory.hooks import active_layers
from tests.helpers.tiny_models import random_ids, tiny_model


def _layers_written(model, ids) -> list[str]:
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=ids, memory=memory)
    return sorted(memory.states)


def test_adapter_on_more_layers_added_after_a_call_is_seen() -> None:
    model = get_peft_model(tiny_model("llama"), DeltaMemConfig(target_modules=r".*layers\.0\.self_attn"))
    ids = random_ids(1, 6)
    assert len(_layers_written(model, ids)) == 1  # the layer list is cached by this call
    model.add_adapter("wide", DeltaMemConfig(target_modules=["self_attn"]))  # wraps layer 1 too: a new δ-mem layer
    model.set_adapter("wide")
    assert len(_layers_written(model, ids)) == 2
    model.set_adapter("default")
    assert len(_layers_written(model, ids)) == 1  # layer 1 has no "default" adapter


def test_disabled_adapters_and_deep_copies_use_their_own_layers() -> None:
    model = get_peft_model(tiny_model("llama", seed=2), DeltaMemConfig())
    ids = random_ids(1, 7, seed=3)
    _layers_written(model, ids)  # caches the layer list
    inner = model.base_model.model
    assert [m for m, _ in active_layers(inner)] == [m for m in inner.modules() if isinstance(m, DeltaMemAttention)]
    twin = copy.deepcopy(model)
    twin_inner = twin.base_model.model
    twin_layers = [m for m, _ in active_layers(twin_inner)]
    assert twin_layers == [m for m in twin_inner.modules() if isinstance(m, DeltaMemAttention)]
    assert {id(m) for m in twin_layers}.isdisjoint({id(m) for m, _ in active_layers(inner)})
    with model.disable_adapter():
        assert active_layers(inner) == []
        assert _layers_written(model, ids) == []  # the base model runs; the memory stays empty
    assert len(_layers_written(model, ids)) == 2
