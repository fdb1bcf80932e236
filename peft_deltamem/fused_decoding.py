"""A δ-mem layer's one-token step through the fused decode op (:mod:`peft_deltamem.ops.fused`).

The layer (:mod:`peft_deltamem.layer`) asks :func:`fused_step` first when the fused step is switched on; None sends
it down its eager path, which then runs as if the fused step had never been asked (nothing is changed before the op
returns). What the op needs besides the call's tensors is worked out once per adapter (:func:`fused_plan`), since a
decode step runs this for every layer and token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import DeltaMemConfig
from .memory.context import MemoryCallContext
from .ops import fused as fused_op

# The memory's input projections come in the layer's stacking order: q, k, v, then the gates (β[, λ]).
_GATES_FROM = 3


class FusedPlan(NamedTuple):
    """The fused op's fixed arguments for one adapter of one layer."""

    modules: tuple[nn.Linear, ...]  # input projections (q, k, v, β[, λ]), then the correction heads
    inputs: int  # how many of ``modules`` are input projections
    options: tuple  # scale, heads, r, normalize_qk, couple_lambda, mode index, gate width
    token_writes: bool  # the adapter writes tokens (segment writes take the eager path; reads need not)


def fused_plan(
    config: DeltaMemConfig, inputs: dict[str, nn.Linear], deltas: tuple[nn.Linear, ...], o_norm, scale
) -> FusedPlan | None:
    """The fused op's fixed arguments, or None for what it does not compute (a learned scale, an RMS-normalised
    o head). ``inputs`` are the input projections by name in stacking order, ``deltas`` the correction heads."""
    if o_norm is not None or scale is not None:
        return None
    heads = config.num_state_heads
    mode = fused_op.MODES.index(config.state_update_mode)
    gate_width = inputs["write_gate"].out_features // heads
    options = (config.scale, heads, config.r, config.normalize_qk, config.couple_lambda, mode, gate_width)
    token_writes = config.write_granularity == "token"
    return FusedPlan((*inputs.values(), *deltas), len(inputs), options, token_writes)


def fused_step(
    plan: FusedPlan | None,
    heads: tuple[str, ...],
    memory_key: str,
    hidden_states: torch.Tensor,
    context: MemoryCallContext,
) -> dict[str, torch.Tensor] | None:
    """Memory step and corrections of one decoded token in one call of the fused op: the corrections by head name
    (``heads``, in the order of the plan's correction modules), the state after a write recorded in ``context`` (a
    read-only call records nothing, as the eager path). None where it does not apply (no plan, more than one token,
    a segment write or segment ids, gradients wanted, not float32 on the CPU)."""
    batch, length, _ = hidden_states.shape
    if plan is None or length != 1 or hidden_states.dtype != torch.float32:
        return None
    if context.write and (not plan.token_writes or context.segment_ids is not None):
        return None  # a segment write, or token writes that skip some tokens: the eager path's
    weights = [m.weight for m in plan.modules]  # read at every call: parameters are updated in place
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(w.requires_grad for w in weights)):
        return None
    gates = plan.modules[_GATES_FROM : plan.inputs]
    gate_bias = gates[0].bias if len(gates) == 1 else torch.cat([m.bias for m in gates])
    token_mask = context.token_mask  # [B, 1]
    outputs = fused_op.decode_step(
        hidden_states,
        weights[: plan.inputs],
        gate_bias,
        context.initial_state(memory_key),
        None if context.all_valid else token_mask,
        context.write,
        weights[plan.inputs :],
        *plan.options,
    )
    if not outputs:  # some tensor is not float32 on the CPU (checked there, at no cost here): the eager path's
        return None
    _, final_state, write_gate, *corrections = outputs
    if context.write:
        state_heads = plan.options[1]
        if state_heads > 1:
            token_mask = token_mask.repeat_interleave(state_heads, dim=0)
        context.record(memory_key, final_state, write_gate, token_mask)
    return dict(zip(heads, corrections, strict=True))
