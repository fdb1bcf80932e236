"""Importing reference-format adapters (docs/design.md §6): outputs match an independent evaluation of docs/design.md §1.

The reference directories are written here with random bf16 tensors under the documented names and shapes. The
expected logits come from ``reference_logits`` below: a plain per-token loop over the tiny base model written from the
design text, hooked onto the base model's own attention modules; it does not use any of peft_deltamem's layer code.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem.cli.convert import main as convert_main
from peft_deltamem.interop.convert import (
    REFERENCE_CONFIG_NAME,
    REFERENCE_WEIGHTS_NAME,
    ReferenceConfigWarning,
    ReferenceFormatError,
    convert_reference_adapter,
    export_reference_adapter,
)
from tests.helpers.tiny_models import random_ids, randomize_adapter, tiny_model

HEADS = ("q", "k", "v", "o")
# Fields of the upstream config dump that this package does not use, plus some it has never heard of.
EXTRA_FIELDS = {
    "memory_partition_routing": "soft",
    "memory_reader_hidden_size": 1024,
    "latent_memory_slots": 4,
    "learning_rate": 2e-4,
    "a_future_field": {"nested": [1, 2, 3]},
}


def reference_config(**overrides) -> dict:
    """A reference config dump: the published TSW recipe, with overrides."""
    config = {
        "rank": 8,
        "alpha": 16.0,
        "beta_bias_init": -1.5,
        "normalize_qk": True,
        "couple_lambda": True,
        "state_update_mode": "standard",
        "rankwise_gates": True,
        "output_init": "base_slice_fixed",
        "base_slice_ref_width": 8,
        "online_gain": 0.05,
        "num_state_heads": 1,
        "memory_readout_mode": "delta",
        "memory_write_granularity": "token",
        "target_modules": ["self_attn"],
        "target_layers": [],
        "delta_heads": ["q", "o"],
        "delta_o_rmsnorm": False,
        "delta_o_rmsnorm_eps": 1e-6,
        "trainable_delta_scale": False,
        "delta_scale_init": 1.0,
        "delta_scale_max": 2.0,
        "delta_scale_granularity": "layer",
        **EXTRA_FIELDS,
    }
    config.update(overrides)
    return config


def reference_tensors(model, config: dict, *, seed: int = 0, hidden: int | None = None) -> dict[str, torch.Tensor]:
    """Random bf16 tensors with the documented names and shapes for every targeted layer of ``model``."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(torch.bfloat16)

    r, n = config["rank"], config["num_state_heads"]
    d, g = n * r, n * (r if config["rankwise_gates"] else 1)
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        if config["target_layers"] and i not in config["target_layers"]:
            continue
        attn, prefix = layer.self_attn, f"model.layers.{i}.self_attn."
        h = hidden or attn.q_proj.in_features
        tensors[prefix + "memory_q_proj"] = rand(d, h, scale=0.3)
        tensors[prefix + "memory_k_proj"] = rand(d, h, scale=0.3)
        tensors[prefix + "memory_v_proj"] = rand(d, h, scale=0.3)
        tensors[prefix + "beta_proj"] = rand(g, h, scale=0.2)
        tensors[prefix + "beta_bias"] = rand(g, scale=0.5)
        if not config["couple_lambda"]:
            tensors[prefix + "lambda_proj"] = rand(g, h, scale=0.2)
            tensors[prefix + "lambda_bias"] = rand(g, scale=0.5, offset=1.0)
        for head in HEADS:
            out = getattr(attn, f"{head}_proj").out_features
            # Upstream modules hold all four heads and keep the inactive ones at zero.
            active = head in config["delta_heads"]
            tensors[prefix + f"delta_{head}_proj"] = (
                rand(out, d, scale=0.2) if active else torch.zeros(out, d).bfloat16()
            )
        if config["delta_o_rmsnorm"]:
            tensors[prefix + "delta_o_rmsnorm_weight"] = rand(attn.o_proj.out_features, scale=0.1, offset=1.0)
        if config["trainable_delta_scale"]:
            tensors[prefix + "delta_scale_raw"] = rand(4 if config["delta_scale_granularity"] == "head" else 1)
    return tensors


def write_reference(directory: Path, config: dict, tensors: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / REFERENCE_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    torch.save(tensors, directory / REFERENCE_WEIGHTS_NAME)
    return directory


# ------------------------------------------------------------------------------ the independent §1 evaluation
def memory_reads(h: torch.Tensor, w: dict, config: dict) -> torch.Tensor:
    """o_t for every token of one sequence h [T, H], token by token from S_0 = 0 (docs/design.md §1, token writes)."""
    r, n = config["rank"], config["num_state_heads"]
    g = r if config["rankwise_gates"] else 1
    states = [torch.zeros(r, r) for _ in range(n)]
    reads = torch.zeros(h.shape[0], n * r)
    for t in range(h.shape[0]):
        x = h[t]
        for p in range(n):
            rows, gate_rows = slice(p * r, (p + 1) * r), slice(p * g, (p + 1) * g)
            q = w["memory_q_proj"][rows] @ x
            k = w["memory_k_proj"][rows] @ x
            v = w["memory_v_proj"][rows] @ x
            if config["normalize_qk"]:
                q, k = torch.tanh(q), torch.tanh(k)
                q, k = q / q.norm(), k / k.norm()
            beta = torch.sigmoid(w["beta_proj"][gate_rows] @ x + w["beta_bias"][gate_rows])
            if config["couple_lambda"]:
                lam = 1 - beta
            else:
                lam = torch.sigmoid(w["lambda_proj"][gate_rows] @ x + w["lambda_bias"][gate_rows])
            mode = config["state_update_mode"]
            keep, erase, write = {
                "standard": (lam, beta, beta),
                "lambda_outside": (lam, lam * beta, beta),
                "no_lambda": (torch.ones_like(beta), beta, beta),
            }[mode]
            s = states[p]
            reads[t, rows] = s @ q  # read before write
            keep, erase, write = keep.view(-1, 1), erase.view(-1, 1), write.view(-1, 1)  # gates act on rows
            states[p] = keep * s - erase * torch.outer(s @ k, k) + write * torch.outer(v, k)
    return reads


def correction(head: str, reads: torch.Tensor, w: dict, config: dict) -> torch.Tensor:
    delta = reads @ w[f"delta_{head}_proj"].T
    if head == "o" and config["delta_o_rmsnorm"]:
        delta = delta / torch.sqrt(delta.pow(2).mean(-1, keepdim=True) + config["delta_o_rmsnorm_eps"])
        delta = delta * w["delta_o_rmsnorm_weight"]
    scale = config["alpha"] / config["rank"]
    if config["trainable_delta_scale"]:
        raw = w["delta_scale_raw"].reshape(-1)
        index = HEADS.index(head) if config["delta_scale_granularity"] == "head" else 0
        scale = scale * torch.sigmoid(raw[index]) * config["delta_scale_max"]
    return scale * delta


@torch.no_grad()
def reference_logits(model, config: dict, tensors: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the plain base model with the §1 memory hooked onto its attention modules and projections."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        if config["target_layers"] and i not in config["target_layers"]:
            continue
        attn, prefix = layer.self_attn, f"model.layers.{i}.self_attn."
        w = {key[len(prefix) :]: t.float() for key, t in tensors.items() if key.startswith(prefix)}
        box = {}

        def read_memory(module, args, kwargs, w=w, box=box):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            box["reads"] = torch.stack([memory_reads(row, w, config) for row in h])

        handles.append(attn.register_forward_pre_hook(read_memory, with_kwargs=True))
        for head in config["delta_heads"]:

            def add(module, inputs, output, head=head, w=w, box=box):
                return output + correction(head, box["reads"], w, config)

            handles.append(getattr(attn, f"{head}_proj").register_forward_hook(add))
    try:
        return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------- tests
CASES = {
    "heads_q_o": ("llama", {}),
    "heads_qkvo_2_state_heads": ("qwen3", {"delta_heads": ["q", "k", "v", "o"], "num_state_heads": 2}),
    "uncoupled_lambda_outside": (
        "llama",
        {"couple_lambda": False, "state_update_mode": "lambda_outside", "rankwise_gates": False, "target_layers": [1]},
    ),
    "delta_o_rmsnorm": ("qwen3", {"delta_o_rmsnorm": True, "delta_heads": ["q", "o"]}),
    "trainable_delta_scale_per_head": (
        "llama",
        {"trainable_delta_scale": True, "delta_scale_granularity": "head", "delta_heads": ["q", "v", "o"]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_adapter_matches_independent_reference(case, tmp_path):
    arch, overrides = CASES[case]
    config = reference_config(**overrides)
    tensors = reference_tensors(tiny_model(arch), config)
    src = write_reference(tmp_path / "reference", config, tensors)
    with pytest.warns(ReferenceConfigWarning, match="a_future_field"):
        out = convert_reference_adapter(src, tmp_path / "converted")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DELTAMEM" and saved["r"] == 8

    ids = random_ids(2, 11, seed=3)
    expected = reference_logits(tiny_model(arch), config, tensors, ids)
    base_logits = tiny_model(arch)(input_ids=ids).logits.detach()
    assert (expected - base_logits).abs().max() > 1e-2, "the memory must visibly change the logits"

    model = PeftModel.from_pretrained(tiny_model(arch), out)
    with torch.no_grad():
        actual = model(input_ids=ids, memory=MemoryState()).logits
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_model("llama").save_pretrained(directory)
    return directory


def test_base_model_is_checked_and_recorded(tmp_path, base_dir):
    config = reference_config()
    src = write_reference(tmp_path / "reference", config, reference_tensors(tiny_model("llama"), config))
    with pytest.warns(ReferenceConfigWarning):
        out = convert_reference_adapter(src, tmp_path / "converted", base_model_name_or_path=str(base_dir))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert "all 2 decoder layers" in (out / "README.md").read_text()


def test_shape_that_does_not_fit_the_base_model_writes_nothing(tmp_path, base_dir):
    config = reference_config()
    # Trained for a model with hidden size 48: internally consistent, but not this base (hidden 64).
    tensors = reference_tensors(tiny_model("llama"), config, hidden=48)
    src = write_reference(tmp_path / "reference", config, tensors)
    out = tmp_path / "converted"
    with pytest.warns(ReferenceConfigWarning), pytest.raises(ReferenceFormatError, match="does not fit the base model"):
        convert_reference_adapter(src, out, base_model_name_or_path=str(base_dir))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["reference"]  # no temporary directory left behind either


def test_shape_inconsistent_with_the_config_is_refused(tmp_path):
    config = reference_config()
    tensors = reference_tensors(tiny_model("llama"), config)
    tensors["model.layers.0.self_attn.memory_k_proj"] = torch.zeros(16, 64, dtype=torch.bfloat16)  # d must be 8
    src = write_reference(tmp_path / "reference", config, tensors)
    with (
        pytest.warns(ReferenceConfigWarning),
        pytest.raises(ReferenceFormatError, match=r"memory_k_proj: shape \[16, 64\]"),
    ):
        convert_reference_adapter(src, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_truncated_file_gives_a_clear_error_and_keeps_out_untouched(tmp_path):
    config = reference_config()
    src = write_reference(tmp_path / "reference", config, reference_tensors(tiny_model("llama"), config))
    weights = src / REFERENCE_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("previous content")
    with pytest.warns(ReferenceConfigWarning), pytest.raises(ReferenceFormatError, match="truncated or corrupt"):
        convert_reference_adapter(src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


class _Payload:
    """Unpickling this would create a file: a weights-only load must refuse it without running anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_objects_is_refused_without_running_them(tmp_path):
    config = reference_config()
    tensors = reference_tensors(tiny_model("llama"), config)
    marker = tmp_path / "code-ran"
    tensors["model.layers.0.self_attn.beta_bias"] = _Payload(marker)
    src = write_reference(tmp_path / "reference", config, tensors)
    with pytest.warns(ReferenceConfigWarning), pytest.raises(ReferenceFormatError, match="objects other than tensors"):
        convert_reference_adapter(src, tmp_path / "converted")
    assert not marker.exists()
    assert not (tmp_path / "converted").exists()


def test_pickle_with_non_tensor_values_is_refused(tmp_path):
    # Plain numbers and strings pass torch's weights-only unpickler; the converter still refuses them.
    config = reference_config()
    tensors = reference_tensors(tiny_model("llama"), config)
    tensors["model.layers.0.self_attn.beta_bias"] = [0.5] * 8
    tensors["step"] = 1000
    src = write_reference(tmp_path / "reference", config, tensors)
    with pytest.warns(ReferenceConfigWarning), pytest.raises(ReferenceFormatError, match="not tensors.*beta_bias"):
        convert_reference_adapter(src, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"memory_readout_mode": "synthetic_kv"}, "memory_readout_mode='synthetic_kv'"),
        ({"memory_write_granularity": "message_proposals"}, "memory_write_granularity"),
        ({"num_memory_partitions": 4}, "num_memory_partitions"),
        ({"latent_memory_layers": [3]}, "latent_memory_layers"),
    ],
)
def test_unsupported_settings_are_refused(tmp_path, overrides, message):
    config = reference_config(**overrides)
    src = write_reference(tmp_path / "reference", config, reference_tensors(tiny_model("llama"), reference_config()))
    with pytest.raises(ReferenceFormatError, match=message):
        convert_reference_adapter(src, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_unknown_tensor_is_refused(tmp_path):
    config = reference_config()
    tensors = reference_tensors(tiny_model("llama"), config)
    tensors["model.layers.0.self_attn.partition_router"] = torch.zeros(4, 64, dtype=torch.bfloat16)
    src = write_reference(tmp_path / "reference", config, tensors)
    with pytest.warns(ReferenceConfigWarning), pytest.raises(ReferenceFormatError, match="partition_router"):
        convert_reference_adapter(src, tmp_path / "converted")


def test_missing_layer_for_target_layers_is_refused(tmp_path):
    config = reference_config(target_layers=[0, 1])
    tensors = {k: v for k, v in reference_tensors(tiny_model("llama"), config).items() if ".layers.1." not in k}
    src = write_reference(tmp_path / "reference", config, tensors)
    with pytest.warns(ReferenceConfigWarning), pytest.raises(ReferenceFormatError, match=r"holds layers \[0\]"):
        convert_reference_adapter(src, tmp_path / "converted")


def test_cli(tmp_path, base_dir):
    config = reference_config()
    src = write_reference(tmp_path / "reference", config, reference_tensors(tiny_model("llama"), config))
    out, err = io.StringIO(), io.StringIO()
    status = convert_main([str(src), str(tmp_path / "converted"), "--base", str(base_dir)], stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    assert "a_future_field" in err.getvalue() and "wrote" in out.getvalue()
    assert (tmp_path / "converted" / "adapter_model.safetensors").is_file()

    err = io.StringIO()
    assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "x")], stdout=io.StringIO(), stderr=err) == 1
    assert "neither an existing directory nor a Hub repo id" in err.getvalue()


def _trained_like(arch: str, **config):
    model = get_peft_model(tiny_model(arch), DeltaMemConfig(task_type="CAUSAL_LM", **config))
    randomize_adapter(model, seed=5, scale=0.3)
    return model


def _memory_logits(model) -> torch.Tensor:
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=random_ids(2, 7, seed=21), memory=memory)
        return model(input_ids=random_ids(2, 5, seed=22), memory=memory).logits


def test_an_adapter_that_writes_some_roles_only_is_not_exported(tmp_path):
    model = _trained_like("llama", write_roles=["user"])
    with pytest.raises(ReferenceFormatError, match="write_roles"):
        export_reference_adapter(model, tmp_path / "reference")
    assert not (tmp_path / "reference").exists()


@pytest.mark.parametrize("from_directory", [False, True])
def test_export_then_convert_round_trip(tmp_path, base_dir, from_directory):
    model = _trained_like(
        "llama",
        delta_heads=["k", "o"],
        num_state_heads=2,
        couple_lambda=False,
        state_update_mode="no_lambda",
        delta_o_rmsnorm=True,
        trainable_delta_scale=True,
        delta_scale_granularity="head",
        layers_to_transform=[0],
    )
    source = model
    if from_directory:
        model.save_pretrained(tmp_path / "adapter")
        source = tmp_path / "adapter"
    export_reference_adapter(source, tmp_path / "reference")
    reference = json.loads((tmp_path / "reference" / REFERENCE_CONFIG_NAME).read_text())
    assert reference["target_layers"] == [0] and reference["memory_readout_mode"] == "delta"
    keys = torch.load(tmp_path / "reference" / REFERENCE_WEIGHTS_NAME, weights_only=True)
    assert "model.layers.0.self_attn.lambda_proj" in keys and not any(".layers.1." in k for k in keys)
    if not from_directory:  # the model knows every projection's shape, so inactive heads are written as zeros
        assert keys["model.layers.0.self_attn.delta_q_proj"].abs().sum() == 0

    out = convert_reference_adapter(tmp_path / "reference", tmp_path / "back", base_model_name_or_path=str(base_dir))
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), out)
    torch.testing.assert_close(_memory_logits(reloaded), _memory_logits(model), atol=1e-6, rtol=1e-5)
