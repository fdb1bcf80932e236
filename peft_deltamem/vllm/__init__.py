"""δ-mem on vLLM (docs/vllm.md, docs/design.md §9): a vLLM plugin, a checkpoint exporter and per-request memory.

Nothing here imports vLLM at import time: ``import peft_deltamem.vllm`` works without it, and ``import peft_deltamem``
does not import this package at all. The pieces:

- :func:`register` — the ``vllm.general_plugins`` entry point (``pyproject.toml``): registers the δ-mem model classes
  with vLLM's model registry. vLLM calls it in every process it starts.
- :mod:`.export` — ``deltamem export-vllm ADAPTER OUT``: an adapter directory + its base model → a checkpoint
  directory vLLM serves (``config.json`` names the δ-mem architecture; the adapter's weights ride along).
- :mod:`.models`, :mod:`.layer` — the model classes (vLLM's Llama and Qwen3 with a memory layer in each adapted
  attention) and the memory layer, whose per-request state lives in vLLM's Mamba / linear-attention state cache.
- :mod:`.connector` — the KV connector that starts a request from a saved memory and saves the memory it leaves.
- :mod:`.requests` — what a client puts in ``kv_transfer_params`` and how it waits for a saved memory.
"""

from __future__ import annotations

from .requests import (
    CONNECTOR_NAME,
    SUPPORTED_VLLM,
    kv_transfer_config,
    memory_request,
    saved_memory_path,
    wait_for_saved_memory,
)

__all__ = [
    "ARCHITECTURES",
    "CONNECTOR_NAME",
    "SUPPORTED_VLLM",
    "kv_transfer_config",
    "memory_request",
    "register",
    "saved_memory_path",
    "wait_for_saved_memory",
]

# δ-mem architecture name -> (module:class of our vLLM model, the base architectures it serves).
ARCHITECTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "DeltaMemLlamaForCausalLM": (
        "peft_deltamem.vllm.models:DeltaMemLlamaForCausalLM",
        ("LlamaForCausalLM", "MistralForCausalLM"),
    ),
    "DeltaMemQwen3ForCausalLM": ("peft_deltamem.vllm.models:DeltaMemQwen3ForCausalLM", ("Qwen3ForCausalLM",)),
}


def register() -> None:
    """The plugin: register the δ-mem architectures with vLLM (idempotent; vLLM calls it once per process)."""
    from vllm import ModelRegistry

    for name, (target, _bases) in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
    from .config_hooks import install_config_hooks

    install_config_hooks(tuple(ARCHITECTURES))
