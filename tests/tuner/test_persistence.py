"""Adapters save and load like LoRA: files, fresh-process reload, Auto classes, load_adapter, named adapters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_deltamem import DeltaMemConfig, MemoryState
from tests.helpers.tiny_models import random_ids, randomize_adapter, tiny_model

HISTORY, QUESTION = random_ids(2, 9, seed=11), random_ids(2, 5, seed=12)


def memory_logits(model) -> torch.Tensor:
    """Logits of a question after writing a history: exercises every adapter weight."""
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=HISTORY, memory=memory)
        return model(input_ids=QUESTION, memory=memory).logits


def trained_like(seed: int = 0, **config):
    base = tiny_model("qwen3")
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", **config))
    randomize_adapter(model, seed, scale=0.3)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("saved")
    base_dir, adapter_dir = root / "base", root / "adapter"
    tiny_model("qwen3").save_pretrained(base_dir)
    base = type(tiny_model("qwen3")).from_pretrained(base_dir).eval()
    model = get_peft_model(
        base,
        DeltaMemConfig(
            task_type="CAUSAL_LM",
            delta_heads=["q", "k", "v", "o"],
            num_state_heads=2,
            couple_lambda=False,
            delta_o_rmsnorm=True,
            trainable_delta_scale=True,
            delta_scale_granularity="head",
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "deltamem_" in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(adapter_dir)
    # Loaded adapters are frozen (inference mode); compare in the same mode, since CPU kernels may round the last
    # bit differently when parameters require grad.
    model.requires_grad_(False)
    return base_dir, adapter_dir, memory_logits(model)


def test_files_are_written_like_lora(saved) -> None:
    base_dir, adapter_dir, _ = saved
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELTAMEM" and config["r"] == 8 and config["base_model_name_or_path"] == str(base_dir)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    # Flat keys without the adapter name, one per weight, e.g. ...self_attn.deltamem_memory_q.weight
    assert "base_model.model.model.layers.0.self_attn.deltamem_memory_q.weight" in weights
    assert "base_model.model.model.layers.1.self_attn.deltamem_delta_scale" in weights
    assert not any(".default." in key or "base_layer" in key for key in weights)
    assert all(key.split(".self_attn.")[1].startswith("deltamem_") for key in weights)
    assert isinstance(PeftConfig.from_pretrained(str(adapter_dir)), DeltaMemConfig)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import peft_deltamem
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM
    from peft_deltamem import MemoryState
    base_dir, adapter_dir, out = sys.argv[1:4]
    history, question = torch.load(out + ".inputs")
    def run(model):
        memory = MemoryState()
        with torch.no_grad():
            model(input_ids=history, memory=memory)
            return model(input_ids=question, memory=memory).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    auto_model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    plain.load_adapter(adapter_dir)
    torch.save({"peft": run(peft_model), "auto": run(auto_model), "load_adapter": run(plain)}, out)
    """
)


def test_save_then_load_in_a_fresh_process_reproduces_logits_exactly(saved, tmp_path) -> None:
    base_dir, adapter_dir, expected = saved
    out = tmp_path / "logits.pt"
    torch.save((HISTORY, QUESTION), str(out) + ".inputs")
    script = tmp_path / "reload.py"
    script.write_text(FRESH_PROCESS)
    subprocess.run([sys.executable, str(script), str(base_dir), str(adapter_dir), str(out)], check=True)
    results = torch.load(out)
    for how, logits in results.items():
        assert torch.equal(logits, expected), how


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to the last bit of float32 (multi-threaded CPU kernels may round it differently between setups)."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_two_named_adapters_load_switch_and_delete(saved, tmp_path) -> None:
    base_dir, adapter_dir, expected = saved
    other = trained_like(seed=5, r=4)
    other.save_pretrained(tmp_path / "other")
    other_logits = memory_logits(other)

    base = type(tiny_model("qwen3")).from_pretrained(base_dir).eval()
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="first")
    model.load_adapter(tmp_path / "other", adapter_name="second")
    same(memory_logits(model), expected)
    model.set_adapter("second")
    same(memory_logits(model), other_logits)
    # A memory sized for one adapter does not fit the other.
    memory = MemoryState()
    model(input_ids=HISTORY, memory=memory)
    model.set_adapter("first")
    with pytest.raises(ValueError, match="r=4.*r=8"):
        model(input_ids=QUESTION, memory=memory)
    model.delete_adapter("second")
    assert list(model.peft_config) == ["first"]
    same(memory_logits(model), expected)


def test_an_adapter_loads_under_another_name(saved) -> None:
    base_dir, adapter_dir, expected = saved
    base = type(tiny_model("qwen3")).from_pretrained(base_dir).eval()
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="renamed")
    same(memory_logits(model), expected)


def test_print_trainable_parameters_counts_the_adapter(capsys) -> None:
    model = trained_like()
    model.print_trainable_parameters()
    # Per layer: memory q/k/v 3·8·64, Δq 64·8, Δo 64·8, β 8·64 + 8 (tiny geometry: hidden 64, q_out 64).
    per_layer = 3 * 8 * 64 + 64 * 8 + 64 * 8 + 8 * 64 + 8
    assert f"trainable params: {2 * per_layer:,}" in capsys.readouterr().out
