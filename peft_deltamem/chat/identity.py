"""Which adapter a saved session belongs to: its config (without volatile fields) and a fingerprint of its weights.

Not to be confused with the adapter configuration a :class:`~peft_deltamem.memory.state.MemoryState` records when it is
sized (``MemoryState.adapter_config``, checked against the layout only).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from peft import get_peft_model_state_dict

from ..model import active_deltamem_adapter

# Config fields that do not change what an adapter computes (paths, versions, the train/inference switch, how the
# recurrence is implemented); they are left out of the identity so a session saved with a freshly trained model loads
# into the same adapter loaded with PeftModel.from_pretrained on another machine.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "auto_mapping",
        "scan_impl",
        "scan_chunk_size",
    }
)


class AdapterMismatchError(ValueError):
    """A saved session belongs to another adapter than the model it is loaded into."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):  # e.g. PeftType, TaskType
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def active_adapter(model: Any) -> tuple[str, Any]:
    found = active_deltamem_adapter(model)
    if found is None:
        raise TypeError(
            "MemorySession needs a PeftModel whose active adapter is a δ-mem adapter (peft.get_peft_model(model, "
            f"DeltaMemConfig(...)) or PeftModel.from_pretrained); got {type(model).__name__}."
        )
    return found


def adapter_identity(model: Any) -> dict[str, Any]:
    """The identity of the model's active adapter: its config (without volatile fields) and a weight fingerprint.

    The fingerprint is a SHA-256 over the adapter's state dict (names, shapes and float32 values, in name order), so
    casting the adapter to another floating dtype and back, or saving and reloading it, keeps it.
    """
    name, adapter_config = active_adapter(model)
    config = {k: _jsonable(v) for k, v in adapter_config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256()
    # save_embedding_layers=False: PEFT would otherwise look up the base model's config (possibly on the Hub).
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    for key in sorted(state):
        tensor = state[key].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return {"adapter_name": name, "config": config, "fingerprint": digest.hexdigest()}


def identity_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """A description of how two adapter identities differ, or None if they are the same adapter."""
    saved_config, config = saved.get("config", {}), current["config"]
    differing = [
        f"{key}: saved {saved_config.get(key)!r}, model {config.get(key)!r}"
        for key in sorted(set(saved_config) | set(config))
        if saved_config.get(key) != config.get(key)
    ]
    if differing:
        return "adapter config differs (" + "; ".join(differing[:6]) + ("; …" if len(differing) > 6 else "") + ")"
    if saved.get("fingerprint") != current["fingerprint"]:
        return (
            "adapter weights differ (fingerprint of the saved session "
            f"{str(saved.get('fingerprint'))[:12]}…, of the model {current['fingerprint'][:12]}…)"
        )
    return None
