"""Carrying a `MemoryState` through one model call.

A forward pre-hook on the base model turns the call's ``memory=`` / ``memory_write=`` keyword arguments and its 2-D
``attention_mask`` into a :class:`MemoryCallContext`, which travels to every δ-mem layer as the keyword argument
``deltamem_context`` (transformers passes ``**kwargs`` from the model down to its attention modules). Travelling as an
argument, not as module state, matters for gradient checkpointing: the recomputation in the backward pass receives
the same context, reads the same initial states and records the same final states. A forward hook commits the final
states into the memory once the call has finished.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpointing import prepare_checkpointing
from .context import CONTEXT_KWARG, MemoryCallContext
from .generation import MemoryCache
from .state import MemoryLayout, MemoryState

__all__ = [
    "CONTEXT_KWARG",
    "MemoryCallContext",
    "active_layers",
    "install_memory_hooks",
    "remove_memory_hooks",
]

_HOOKS_ATTR = "_deltamem_memory_hooks"
_LAYERS_ATTR = "_deltamem_layers"


def _deltamem_layers(model: nn.Module) -> list[Any]:
    """The model's δ-mem layers in module order, as the tuner handed them to :func:`install_memory_hooks`.

    Walking ``model.modules()`` costs about a millisecond on a 30-layer model, more than a whole layer's memory step
    during decoding, so the tuner keeps the list on the model and hands a new one whenever it wraps modules.
    """
    return model.__dict__.get(_LAYERS_ATTR) or []


def active_layers(model: nn.Module) -> list[tuple[Any, str]]:
    """The model's δ-mem layers with an active adapter, as (layer, adapter name); empty while adapters are off."""
    layers = []
    for module in _deltamem_layers(model):
        adapter = module._current_adapter()
        if adapter is not None:
            layers.append((module, adapter))
    return layers


def _call_tensor(args: tuple, kwargs: dict, name: str, position: int) -> torch.Tensor | None:
    if kwargs.get(name) is not None:
        return kwargs[name]
    return args[position] if len(args) > position and torch.is_tensor(args[position]) else None


def _memory_cache(args: tuple, kwargs: dict) -> MemoryCache | None:
    """The call's :class:`MemoryCache`, found by its type wherever it was passed.

    Looking by type, not by keyword, keeps generation from losing its memory when transformers renames the cache
    argument again (5.24 renamed ``past_key_values`` to ``cache``; its ``generate`` passes the new name).
    """
    for value in (*kwargs.values(), *args):
        if isinstance(value, MemoryCache):
            return value
    return None


def _before_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    memory: MemoryState | None = kwargs.pop("memory", None)
    write = kwargs.pop("memory_write", True)
    read = kwargs.pop("memory_read", True)
    segment_ids = kwargs.pop("memory_segment_ids", None)
    record_write_gates = kwargs.pop("memory_record_write_gates", False)
    kwargs.pop(CONTEXT_KWARG, None)
    layers = active_layers(model)
    if not layers:
        return args, kwargs  # adapters disabled or unloaded: the base model runs, the memory is untouched
    if memory is not None and not isinstance(memory, MemoryState):
        raise TypeError(f"memory= must be a peft_deltamem.MemoryState, got {type(memory).__name__}")
    tokens = _call_tensor(args, kwargs, "input_ids", 0)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        raise ValueError("δ-mem needs input_ids or inputs_embeds to size its memory.")
    batch, length = tokens.shape[:2]
    attention_mask = _call_tensor(args, kwargs, "attention_mask", 1)
    if attention_mask is None:
        token_mask = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
    elif attention_mask.dim() == 2:
        # During generation the mask covers past + current tokens; the current ones are the last `length`.
        token_mask = attention_mask[:, -length:].to(device=tokens.device, dtype=torch.bool)
    else:
        raise ValueError(
            "δ-mem takes token validity from a 2-D attention_mask [batch, tokens]; got a "
            f"{attention_mask.dim()}-D mask. Pass the 2-D padding mask (1 = real token)."
        )
    cache = _memory_cache(args, kwargs)
    if memory is None and cache is not None:
        # generate(): the memory travels in the cache, which also knows which rows have ended.
        memory, active_rows = cache.memory_call(_call_tensor(args, kwargs, "input_ids", 0), batch, length)
        write = write and cache.memory_write
        token_mask = token_mask & active_rows.to(token_mask.device).unsqueeze(1)
    first, adapter = layers[0]
    config = first.deltamem_config[adapter]
    layout = MemoryLayout(config.r, config.num_state_heads, tuple(layer.memory_key for layer, _ in layers))
    memory = MemoryState() if memory is None else memory
    # The adapter's configuration is recorded only when an empty memory is sized; a sized memory keeps its own.
    memory._bind(layout, batch, tokens.device, _config_record(config) if memory.is_empty else memory.adapter_config)
    context = MemoryCallContext(
        memory=memory,
        token_mask=token_mask,
        # One check per model call, so that the layers skip masking at every layer when no token is padding.
        all_valid=bool(token_mask.all()),
        write=bool(write),
        read=bool(read),
        segment_ids=_segment_ids(segment_ids, batch, length, tokens.device),
        # Most calls find the states on the right device already; .to() would still cost an operator call each.
        initial_states={k: v if v.device == tokens.device else v.to(tokens.device) for k, v in memory.states.items()},
        record_write_gates=bool(record_write_gates),
    )
    kwargs[CONTEXT_KWARG] = context
    if torch.is_grad_enabled():  # a reentrant checkpoint must carry the memory through
        prepare_checkpointing(model, _deltamem_layers(model))
    return args, kwargs


def _segment_ids(ids, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    if ids is None:
        return None
    ids = torch.as_tensor(ids, device=device, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.shape != (batch, length):
        raise ValueError(
            f"memory_segment_ids must have one id per input token, shape ({batch}, {length}); got {tuple(ids.shape)}."
        )
    return ids


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    context: MemoryCallContext | None = kwargs.get(CONTEXT_KWARG)
    if context is None:
        return output
    context.check_reached()
    if context.write:
        context.memory.commit(context.final_states)
    if context.record_write_gates:
        context.memory.record_write_gates(context.write_gates)
    return output


def _config_record(config) -> dict:
    """The adapter configuration recorded with a memory (JSON-serialisable)."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def install_memory_hooks(model: nn.Module, layers: list[nn.Module]) -> None:
    """Install the memory pre/post hooks on the base model once (idempotent) and keep its δ-mem ``layers``.

    The tuner calls this whenever it has wrapped modules (a new adapter may wrap more of them), handing the model's
    δ-mem layers in module order.
    """
    object.__setattr__(model, _LAYERS_ATTR, list(layers))
    if getattr(model, _HOOKS_ATTR, None):
        return
    handles = [
        model.register_forward_pre_hook(_before_forward, with_kwargs=True),
        model.register_forward_hook(_after_forward, with_kwargs=True),
    ]
    object.__setattr__(model, _HOOKS_ATTR, handles)


def remove_memory_hooks(model: nn.Module) -> None:
    """Remove the hooks installed by :func:`install_memory_hooks`."""
    for handle in getattr(model, _HOOKS_ATTR, None) or []:
        handle.remove()
    if hasattr(model, _HOOKS_ATTR):
        object.__delattr__(model, _HOOKS_ATTR)
    model.__dict__.pop(_LAYERS_ATTR, None)
