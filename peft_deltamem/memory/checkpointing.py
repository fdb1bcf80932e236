"""Exact gradients under reentrant gradient checkpointing (``use_reentrant=True``).

The memory context travels to the δ-mem layers as a keyword argument (see :mod:`peft_deltamem.memory.hooks`). A reentrant
checkpoint (``torch.utils.checkpoint`` with ``use_reentrant=True``, and most third-party checkpoint functions) only
differentiates through the positional tensors it is given and the tensors its function returns: it runs the layer
under ``torch.no_grad`` and replays it in the backward pass. The memory a layer reads at the start of a call and the
memory it leaves behind are neither, so the gradients through the memory (from a read pass back into the write pass
that filled it) would be dropped without a word.

:func:`prepare_checkpointing` wraps the checkpoint function of every checkpointed module of a δ-mem model so that,
for a call that carries a memory context, the layer's initial memory states and its trainable adapter parameters go in
as positional inputs, and its final memory states (and recorded write gates) come out as outputs. The gradients are
then those of the un-checkpointed model. Non-reentrant checkpoints (``use_reentrant=False``) already see every tensor
and are left as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from .context import CONTEXT_KWARG, MemoryCallContext

_MODULES_ATTR = "_deltamem_checkpointed_modules"


def prepare_checkpointing(model: nn.Module, layers: list[nn.Module]) -> None:
    """Make every checkpoint function of ``model`` carry the δ-mem memory through (idempotent, cheap per call).

    transformers sets ``_gradient_checkpointing_func`` on each checkpointable module when gradient checkpointing is
    enabled, which may happen before or after the adapter is added, so this runs before every call that records
    gradients and wraps the functions it has not wrapped yet. ``layers`` is the model's δ-mem layer list (the one the
    tuner handed to the memory hooks): the checkpointable modules are looked up again only when it is a new list.
    """
    cached = model.__dict__.get(_MODULES_ATTR)
    if cached is None or cached[0] is not layers:
        cached = (layers, [m for m in model.modules() if hasattr(m, "gradient_checkpointing")])
        object.__setattr__(model, _MODULES_ATTR, cached)
    for module in cached[1]:
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, ExactCheckpoint):
            module._gradient_checkpointing_func = ExactCheckpoint(func)


def restore_checkpointing(model: nn.Module) -> None:
    """Undo :func:`prepare_checkpointing` (used when the adapter is unloaded)."""
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, ExactCheckpoint):
            module._gradient_checkpointing_func = func.func
    model.__dict__.pop(_MODULES_ATTR, None)


class ExactCheckpoint:
    """A checkpoint function (``func(function, *args, **kwargs)``) that passes the δ-mem memory through a reentrant
    checkpoint as positional inputs and outputs; calls without a memory context, and non-reentrant checkpoints, go to
    ``func`` unchanged."""

    def __init__(self, func: Callable) -> None:
        self.func = func
        self.__wrapped__ = func

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        keywords = getattr(function, "keywords", None) or {}
        context = keywords.get(CONTEXT_KWARG)
        use_reentrant = {**(getattr(self.func, "keywords", None) or {}), **kwargs}.get("use_reentrant")
        if not isinstance(context, MemoryCallContext) or use_reentrant is False:
            return self.func(function, *args, **kwargs)
        owner = function.args[0] if isinstance(function, partial) and function.args else None
        return _checkpoint_through_memory(self.func, function, owner, context, args, kwargs)


def _checkpoint_through_memory(
    func: Callable,
    function: Callable,
    owner: Any,
    context: MemoryCallContext,
    args: tuple,
    kwargs: dict,
) -> Any:
    if isinstance(owner, nn.Module):
        layers = [m for m in owner.modules() if _is_deltamem_layer(m)]
        keys = [m.memory_key for m in layers if m.memory_key in context.initial_states]
        params = [
            p
            for m in layers
            for name, p in m.named_parameters()
            if p.requires_grad and not name.startswith("base_layer.")
        ]
    else:  # an unknown checkpointed callable: pass every layer's memory through
        keys, params = list(context.initial_states), []
    n_args, n_keys = len(args), len(keys)
    structure: dict[str, Any] = {}

    def run(*inputs: Any) -> tuple:
        states = dict(zip(keys, inputs[n_args : n_args + n_keys], strict=True))
        # The parameters (inputs after the states) are used through their modules; they are inputs only so that the
        # checkpoint's outputs require grad and its backward replays the layer even when nothing else does.
        inner = dataclasses.replace(
            context,
            initial_states={**context.initial_states, **states},
            final_states={},
            write_gates={},
        )
        out = function(*inputs[:n_args], **{CONTEXT_KWARG: inner})
        written = [k for k in keys if k in inner.final_states]
        gated = [k for k in written if k in inner.write_gates]
        if "written" not in structure:
            if not (isinstance(out, torch.Tensor) or type(out) is tuple):
                raise RuntimeError(
                    f"δ-mem cannot carry its memory through a reentrant gradient checkpoint of a layer that returns "
                    f"{type(out).__name__}. Enable gradient checkpointing with "
                    'gradient_checkpointing_kwargs={"use_reentrant": False}.'
                )
            structure.update(
                written=written,
                gated=gated,
                masks={k: inner.write_gates[k][1] for k in gated},
                n_out=len(out) if isinstance(out, tuple) else None,
            )
        outputs = out if isinstance(out, tuple) else (out,)
        extras = [inner.final_states[k] for k in written] + [inner.write_gates[k][0] for k in gated]
        return (*outputs, *extras)

    states = [context.initial_states[k] for k in keys]
    result = func(run, *args, *states, *params, **kwargs)
    n_out = structure["n_out"]
    head = 1 if n_out is None else n_out
    extras = result[head:]
    written, gated = structure["written"], structure["gated"]
    for key, state in zip(written, extras[: len(written)], strict=True):
        context.final_states[key] = state
    for key, gate in zip(gated, extras[len(written) :], strict=True):
        context.write_gates[key] = (gate, structure["masks"][key])
    return result[0] if n_out is None else tuple(result[:n_out])


def _is_deltamem_layer(module: nn.Module) -> bool:
    """A δ-mem layer (``DeltaMemAttention``), recognised by its memory key without importing the tuner's layer."""
    return isinstance(getattr(module, "memory_key", None), str) and hasattr(module, "memory_step")
