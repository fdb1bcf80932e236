"""The memory's input projections and the correction heads run as stacked matmuls (decode speed): the results are
those of the separate projections (q and k normalised per state head), and every change of a parameter is seen at
once."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemAttention, DeltaMemConfig, MemoryState
from tests.helpers.tiny_models import random_ids, randomize_adapter, tiny_model


def adapted(**config):
    model = get_peft_model(tiny_model("llama", seed=5), DeltaMemConfig(task_type="CAUSAL_LM", **config))
    randomize_adapter(model, seed=6)
    return model.eval()


@pytest.mark.parametrize(
    "config",
    [
        {"delta_heads": ["q", "k", "v", "o"]},
        {"delta_heads": ["q", "o"], "couple_lambda": False, "num_state_heads": 2, "delta_o_rmsnorm": True},
        {"delta_heads": ["q", "o"], "trainable_delta_scale": True, "delta_scale_granularity": "head"},
    ],
)
def test_stacked_projections_equal_the_separate_modules(config) -> None:
    model = adapted(**config)
    layer = next(m for m in model.modules() if isinstance(m, DeltaMemAttention))
    hidden = torch.randn(2, 7, layer.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        projected = layer._project("default", hidden, ("q", "k", "v", "write_gate", "keep_gate"))
        for name, container in (
            ("q", layer.deltamem_memory_q),
            ("k", layer.deltamem_memory_k),
            ("v", layer.deltamem_memory_v),
            ("write_gate", layer.deltamem_write_gate),
            ("keep_gate", layer.deltamem_keep_gate),
        ):
            if "default" in container:
                expected = container["default"](hidden)
                if name in ("q", "k") and layer.deltamem_config["default"].normalize_qk:
                    # the memory's query and key directions: tanh, then unit length per state head
                    per_head = torch.tanh(expected).unflatten(-1, (-1, layer.deltamem_config["default"].r))
                    expected = torch.nn.functional.normalize(per_head, dim=-1).flatten(-2)
                torch.testing.assert_close(projected[name], expected, rtol=1e-5, atol=1e-5)
            else:
                assert name not in projected  # λ = 1 − β: no keep gate
        reads = torch.randn(2, 7, layer.deltamem_memory_q["default"].out_features)
        for head, delta in layer.corrections("default", reads).items():
            separate = getattr(layer, f"deltamem_delta_{head}")["default"](reads)
            if head == "o" and "default" in layer.deltamem_delta_o_norm:
                separate = separate * torch.rsqrt(separate.pow(2).mean(-1, keepdim=True) + 1e-6)
                separate = separate * layer.deltamem_delta_o_norm["default"]
            ratio = delta.norm() / separate.norm()  # the corrections differ from the heads' outputs by a scale only
            torch.testing.assert_close(delta, separate * ratio, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["in_place", "through_data", "load_state_dict"])
def test_every_parameter_update_is_seen_by_the_next_call(how: str) -> None:
    """Optimisers update parameters in place, some through ``param.data`` (which leaves the version counter alone):
    a call after an update must use the new values. A cached stack of weights once missed ``.data`` updates, so an
    evaluation after training ran the untrained adapter."""
    model = adapted(delta_heads=["q", "o"])
    twin = adapted(delta_heads=["q", "o"])
    ids = random_ids(1, 6, seed=9)
    with torch.no_grad():
        model(input_ids=ids, memory=MemoryState())  # a first call under no_grad, as an evaluation before training
        updated = {name: param + 0.25 for name, param in model.named_parameters() if "deltamem_" in name}
        for name, param in model.named_parameters():
            if name in updated and how == "in_place":
                param.copy_(updated[name])
            elif name in updated and how == "through_data":
                param.data.copy_(updated[name])
        if how == "load_state_dict":
            state = model.state_dict()
            state.update({name: value.clone() for name, value in updated.items()})
            model.load_state_dict(state)
        twin.load_state_dict(model.state_dict())  # a model that never ran before the update
        after = model(input_ids=ids, memory=MemoryState()).logits
        expected = twin(input_ids=ids, memory=MemoryState()).logits
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_training_gradients_reach_each_projection() -> None:
    model = adapted(delta_heads=["q", "o"])
    model.train()
    memory = MemoryState()
    model(input_ids=random_ids(1, 6, seed=10), memory=memory)
    model(input_ids=random_ids(1, 4, seed=11), memory=memory, memory_write=False).logits.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if "deltamem_" in name and "keep" not in name}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
        n for n, g in grads.items() if g is None or g.abs().sum() == 0
    ]


def test_a_deep_copy_corrects_with_its_own_layers() -> None:
    """The projection hooks find the corrections on the projection itself: a deep copy is a working, independent
    model (they once read the original's layers, so a copy silently ran without corrections)."""
    model = adapted(delta_heads=["q", "o"])
    twin = copy.deepcopy(model)
    ids, history = random_ids(1, 5, seed=12), random_ids(1, 6, seed=13)
    with torch.no_grad():
        memory, twin_memory = MemoryState(), MemoryState()
        model(input_ids=history, memory=memory)
        twin(input_ids=history, memory=twin_memory)
        ours = model(input_ids=ids, memory=memory, memory_write=False).logits
        theirs = twin(input_ids=ids, memory=twin_memory, memory_write=False).logits
        with twin.disable_adapter():
            base = twin(input_ids=ids).logits
        for name, param in twin.named_parameters():
            if "deltamem_delta" in name:
                param.zero_()  # the twin's own corrections vanish; the original's stay
        twin_zeroed = twin(input_ids=ids, memory=twin_memory, memory_write=False).logits
        again = model(input_ids=ids, memory=memory, memory_write=False).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert (ours - base).abs().max() > 1e-3  # the memory corrects the copy's output
    torch.testing.assert_close(twin_zeroed, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_adding_and_deleting_an_adapter_rebuilds_the_plan_and_the_hooks() -> None:
    """The layer looks its modules up once per adapter and hooks only the projections some adapter corrects: an
    adapter added later, with other heads, must run its own modules through hooks of its own, and the first adapter
    must run as before once the second is deleted."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = adapted(delta_heads=["q", "o"])
    layer = next(m for m in model.modules() if isinstance(m, DeltaMemAttention))
    ids, history = random_ids(1, 5, seed=14), random_ids(1, 6, seed=15)

    def answer(peft_model) -> torch.Tensor:
        memory = MemoryState()
        with torch.no_grad():
            peft_model(input_ids=history, memory=memory)
            return peft_model(input_ids=ids, memory=memory, memory_write=False).logits

    first = answer(model)  # builds the first adapter's plan
    assert not layer._projections["k"]._forward_hooks and not layer._projections["v"]._forward_hooks
    model.add_adapter("kv", DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=["k", "v"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".kv." in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(16)) * 0.5)
    model.set_adapter("kv")
    assert layer._projections["k"]._forward_hooks and layer._projections["v"]._forward_hooks
    twin = get_peft_model(tiny_model("llama", seed=5), DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=["k", "v"]))
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model, adapter_name="kv"))
    second = answer(model)
    torch.testing.assert_close(second, answer(twin.eval()), rtol=0, atol=1e-6)
    assert (second - first).abs().max() > 1e-3
    model.set_adapter("default")
    model.delete_adapter("kv")
    torch.testing.assert_close(answer(model), first, rtol=0, atol=0)
    # the same name again, other heads: a plan kept from the deleted adapter would run modules that no longer exist
    model.add_adapter("kv", DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=["v"], init_delta_heads="random"))
    model.set_adapter("kv")
    again = get_peft_model(tiny_model("llama", seed=5), DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=["v"]))
    set_peft_model_state_dict(again, get_peft_model_state_dict(model, adapter_name="kv"))
    torch.testing.assert_close(answer(model), answer(again.eval()), rtol=0, atol=1e-6)
