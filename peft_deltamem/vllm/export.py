"""``deltamem export-vllm``: a δ-mem adapter + its base model → a checkpoint directory vLLM serves with the plugin.

The directory is the base model's checkpoint (weights, tokenizer, generation config) plus:

- ``deltamem.safetensors``: the adapter's weights under the module names of the vLLM model
  (``model.layers.{i}.self_attn.deltamem.deltamem_memory_q.default.weight`` …), float32;
- in ``config.json``: ``architectures`` names the δ-mem architecture (``DeltaMemLlamaForCausalLM``,
  ``DeltaMemQwen3ForCausalLM``), ``layer_types`` marks the layers "hybrid" (attention + a recurrent state: what makes
  vLLM allocate state slots), and a ``deltamem`` section holds the adapter configuration (as memories record it) and
  the adapted layers (index → the memory's layer name).

vLLM itself is not needed to export (this module imports transformers and peft only).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._io import atomic_path

DELTAMEM_WEIGHTS = "deltamem.safetensors"
FORMAT_VERSION = 1


def _architecture_for(base_architectures: list[str]) -> str:
    from . import ARCHITECTURES

    for name, (_target, bases) in ARCHITECTURES.items():
        if any(arch in bases for arch in base_architectures):
            return name
    supported = sorted(arch for _t, bases in ARCHITECTURES.values() for arch in bases)
    raise ValueError(
        f"δ-mem on vLLM supports base architectures {supported}; this base is {base_architectures}. "
        "Other decoders run with the transformers engine."
    )


def export_vllm_checkpoint(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    base: str | None = None,
    *,
    dtype: str = "auto",
    revision: str | None = None,
) -> Path:
    """Write the vLLM checkpoint of ``adapter`` (a δ-mem adapter directory or Hub id) on ``base`` to ``out``.

    ``base`` defaults to the adapter's ``base_model_name_or_path``; ``dtype`` is the base weights' dtype in the
    checkpoint ("auto": as the base stores them). The adapter weights stay float32. ``out`` appears complete or not
    at all. Returns its path.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..config import DeltaMemConfig
    from ..layer import DeltaMemAttention
    from ..memory.hooks import _config_record

    peft_config = PeftConfig.from_pretrained(str(adapter), revision=revision)
    if not isinstance(peft_config, DeltaMemConfig):
        raise ValueError(f"{adapter} is not a δ-mem adapter (peft_type {peft_config.peft_type}).")
    if peft_config.write_granularity != "token":
        raise ValueError(
            f"δ-mem on vLLM supports token writes only; this adapter writes by {peft_config.write_granularity!r}."
        )
    base = base or peft_config.base_model_name_or_path
    if not base:
        raise ValueError("The adapter does not name its base model; pass base=... (--base).")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    architecture = _architecture_for(list(model.config.architectures or [type(model).__name__]))
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        except (OSError, ValueError):  # a base without a tokenizer: vLLM needs one given separately (tokenizer=...)
            pass
        peft_model = PeftModel.from_pretrained(model, str(adapter), revision=revision)
        adapter_name = peft_model.active_adapter
        config = peft_model.peft_config[adapter_name]
        layers: dict[str, str] = {}
        tensors: dict[str, torch.Tensor] = {}
        for module in peft_model.modules():
            if isinstance(module, DeltaMemAttention):
                match = re.search(r"(?:^|\.)layers\.(\d+)\.", module.memory_key + ".")
                if match is None or not module.memory_key.endswith("self_attn"):
                    raise ValueError(f"cannot place the adapted module {module.memory_key!r} in vLLM's model")
                layers[match.group(1)] = module.memory_key
                for name, param in module.named_parameters():
                    if not name.startswith("deltamem_") or f".{adapter_name}" not in name:
                        continue
                    local = name.replace(f".{adapter_name}", ".default", 1)
                    tensors[f"{module.memory_key}.deltamem.{local}"] = param.detach().float().contiguous().cpu()
        save_file(tensors, str(tmp / DELTAMEM_WEIGHTS), metadata={"format": "pt"})
        index_path = tmp / "model.safetensors.index.json"
        if index_path.exists():  # a sharded checkpoint: vLLM loads the files its index names
            index = json.loads(index_path.read_text())
            index.setdefault("weight_map", {}).update(dict.fromkeys(tensors, DELTAMEM_WEIGHTS))
            index_path.write_text(json.dumps(index, indent=2))
        config_path = tmp / "config.json"
        hf_config: dict[str, Any] = json.loads(config_path.read_text())
        hf_config["architectures"] = [architecture]
        hf_config["layer_types"] = ["hybrid"] * int(hf_config["num_hidden_layers"])
        hf_config["deltamem"] = {
            "format": FORMAT_VERSION,
            "adapter_config": json.loads(json.dumps(_config_record(config), default=str)),
            "layers": layers,
            "base_model": str(base),
            "adapter": str(adapter),
        }
        config_path.write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    return out
