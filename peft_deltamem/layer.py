"""The δ-mem layer: wraps one attention module and corrects its q/k/v/o projections from an r×r memory (docs/design.md §1).

The base attention (masking, RoPE, KV cache, sdpa/eager/flash) runs unchanged: forward hooks on the four projections
add the corrections, so any decoder whose attention has ``q_proj/k_proj/v_proj/o_proj`` works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import DELTA_HEADS, DeltaMemConfig
from .fused_decoding import FusedPlan, fused_plan, fused_step
from .memory.context import CONTEXT_KWARG, MemoryCallContext
from .ops import delta_rule_scan
from .ops.fused import fused_decode_enabled

PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
# Names of the memory's input projections (see DeltaMemAttention._project): the query, and what a write needs.
_QUERY = "q"
_WRITE_INPUTS = ("k", "v", "write_gate", "keep_gate")


def find_projections(attention: nn.Module) -> dict[str, nn.Module] | None:
    """The attention module's q/k/v/o projections by head name, or None if any is missing."""
    found = {head: getattr(attention, name, None) for head, name in PROJECTIONS.items()}
    if any(not isinstance(m, nn.Module) or not hasattr(m, "weight") for m in found.values()):
        return None
    return found


def _stacked_linear(modules: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """``x`` through several Linear layers in one matmul, outputs concatenated on the last dim.

    Decoding runs these small projections once per token and layer, where each matmul call costs more than its
    arithmetic: one call instead of four is most of the per-token overhead saved. The stack is built from the
    current parameters at every call (a copy of a few KB): a cached stack cannot tell when a parameter changed,
    since optimisers that write through ``param.data`` leave its version counter alone.
    """
    if len(modules) == 1:
        return modules[0](x)
    weight = torch.cat([m.weight for m in modules])
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return F.linear(x, weight)
    first = next(i for i, b in enumerate(biases) if b is not None)
    if all(b is not None for b in biases[first:]):
        # The biased modules (the gates) come last: their biases, zero-padded in front, in one or two ops.
        tail = biases[first] if first == len(biases) - 1 else torch.cat(biases[first:])
        bias = F.pad(tail, (sum(m.out_features for m in modules[:first]), 0))
    else:
        bias = torch.cat(
            [m.weight.new_zeros(m.out_features) if b is None else b for m, b in zip(modules, biases, strict=True)]
        )
    return F.linear(x, weight, bias)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` (the same numbers) in three ops instead of four: it runs at every layer and token."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


_PENDING_CORRECTION = "_deltamem_correction"


def _add_pending_correction(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted projection: add the correction its δ-mem layer left on it for the current call.

    The correction lives on the projection, not in a closure over the layer, so a deep copy of the model hooks up
    to its own layers.
    """
    delta = module.__dict__.get(_PENDING_CORRECTION)
    return output if delta is None else output + _as_dtype(delta, output.dtype)


def _as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Even a no-op .to() is an operator call; the decode path runs these for every layer and token.
    return x if x.dtype == dtype else x.to(dtype)


class _Plan(NamedTuple):
    """What one adapter's memory step takes from the layer's containers, looked up once instead of at every call.

    Modules, not tensors: a parameter updated in place (an optimiser step, ``load_state_dict``, ``.to()``) is read
    afresh at every call. Rebuilt whenever the layer's adapters change (:meth:`DeltaMemAttention._forget_plans`).
    """

    config: DeltaMemConfig
    inputs: dict[str, nn.Linear]  # the memory's input projections by name, in stacking order (q, k, v, β, λ)
    heads: tuple[str, ...]  # the correction heads present, in DELTA_HEADS order
    deltas: tuple[nn.Linear, ...]  # their W_Δ, same order
    o_norm: nn.Parameter | None
    scale: nn.Parameter | None  # raw learned scale, None when the scale is the constant config.scale
    fused: FusedPlan | None  # the fused decode step's fixed arguments (peft_deltamem.fused_decoding); None: n/a


_PLANS = "_deltamem_plans"


def state_update_gates(
    mode: str, write_gate: torch.Tensor, keep_gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, erase, write) coefficients of the update from β (write gate) and λ (keep gate), docs/design.md §1."""
    if mode == "standard":
        return keep_gate, write_gate, write_gate
    if mode == "lambda_outside":
        return keep_gate, keep_gate * write_gate, write_gate
    if mode == "no_lambda":
        return torch.ones_like(write_gate), write_gate, write_gate
    raise ValueError(f"unknown state_update_mode {mode!r}")


class DeltaMemAttention(nn.Module, BaseTunerLayer):
    """A tuner layer around one attention module: memory read/write plus low-rank corrections of its projections.

    Per adapter it holds (flat, one container per weight, so PEFT's adapter-name handling works on save and load):
    memory projections ``W_mq, W_mk, W_mv`` [d × H], the write gate ``W_β, b_β``, optionally the keep gate
    ``W_λ, b_λ``, the correction heads ``W_Δ{q,k,v,o}`` [out × d], and the optional o-norm weight and learned scale.
    """

    adapter_layer_names = (
        "deltamem_memory_q",
        "deltamem_memory_k",
        "deltamem_memory_v",
        "deltamem_write_gate",
        "deltamem_keep_gate",
        "deltamem_delta_q",
        "deltamem_delta_k",
        "deltamem_delta_v",
        "deltamem_delta_o",
        "deltamem_delta_o_norm",
        "deltamem_delta_scale",
    )
    other_param_names = ("deltamem_config",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DeltaMemConfig, memory_key: str) -> None:
        super().__init__()
        projections = find_projections(base_layer)
        if projections is None:
            raise ValueError(
                f"δ-mem cannot adapt {memory_key!r} ({type(base_layer).__name__}): it needs child modules "
                f"{list(PROJECTIONS.values())} with weights. Point target_modules at the attention modules."
            )
        self.base_layer = base_layer
        self.memory_key = memory_key
        self.hidden_size = projections["q"].weight.shape[1]
        self.deltamem_config: dict[str, DeltaMemConfig] = {}
        for name in self.adapter_layer_names:
            container = nn.ParameterDict() if name in ("deltamem_delta_o_norm", "deltamem_delta_scale") else None
            setattr(self, name, container if container is not None else nn.ModuleDict())
        # A plain dict, not submodules: the projections are registered once, under the base attention.
        self._projections = projections
        # Hooks only on the projections some adapter corrects: a hooked module call takes torch's slower path, at
        # every layer and token.
        self._hook_handles: dict[str, Any] = {}
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    # ----- parameters ----------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: DeltaMemConfig) -> None:
        """Create (and initialise) the parameters of ``adapter_name`` on this layer."""
        self._forget_plans()
        projections = find_projections(self.base_layer)
        weight = projections["q"].weight
        factory = {"device": weight.device, "dtype": torch.float32}
        hidden, d, gates = (
            self.hidden_size,
            config.num_state_heads * config.r,
            config.num_state_heads * config.gate_width,
        )
        self.deltamem_config[adapter_name] = config
        # Memory q/k/v: nn.Linear's own init is kaiming_uniform(a=√5), as the design asks.
        self.deltamem_memory_q[adapter_name] = nn.Linear(hidden, d, bias=False, **factory)
        self.deltamem_memory_k[adapter_name] = nn.Linear(hidden, d, bias=False, **factory)
        self.deltamem_memory_v[adapter_name] = nn.Linear(hidden, d, bias=False, **factory)
        self.deltamem_write_gate[adapter_name] = self._gate(hidden, gates, config.beta_bias_init, factory)
        if not config.couple_lambda:
            self.deltamem_keep_gate[adapter_name] = self._gate(hidden, gates, config.lambda_bias_init, factory)
        for head in config.delta_heads:
            base = projections[head].weight
            delta = nn.Linear(d, base.shape[0], bias=False, **factory)
            self._init_delta_head(delta.weight, base, config)
            getattr(self, f"deltamem_delta_{head}")[adapter_name] = delta
            if head not in self._hook_handles:
                self._hook_handles[head] = projections[head].register_forward_hook(_add_pending_correction)
        if "o" in config.delta_heads and config.delta_o_rmsnorm:
            out = projections["o"].weight.shape[0]
            self.deltamem_delta_o_norm[adapter_name] = nn.Parameter(torch.ones(out, **factory))
        if config.trainable_delta_scale:
            n_scales = len(DELTA_HEADS) if config.delta_scale_granularity == "head" else 1
            raw = math.log(config.delta_scale_init / (config.delta_scale_max - config.delta_scale_init))
            self.deltamem_delta_scale[adapter_name] = nn.Parameter(torch.full((n_scales,), raw, **factory))
        self.set_adapter(self.active_adapters)

    @staticmethod
    def _gate(hidden: int, width: int, bias: float, factory: dict) -> nn.Linear:
        gate = nn.Linear(hidden, width, bias=True, **factory)
        nn.init.zeros_(gate.weight)
        nn.init.constant_(gate.bias, bias)
        return gate

    @staticmethod
    @torch.no_grad()
    def _init_delta_head(head: torch.Tensor, base: torch.Tensor, config: DeltaMemConfig) -> None:
        """Initialise a correction head W_Δ [out × d] from the base projection's weight [out × in]."""
        head.zero_()
        mode, r = config.init_delta_heads, config.r
        if mode == "zero":
            return
        if mode == "random":
            nn.init.kaiming_uniform_(head, a=math.sqrt(5))
            head.mul_(config.online_gain)
            return
        # base_slice: every state head's first w columns copy the base's first w columns, L2-normalised over the
        # output dim; base_slice_fixed: w also capped by base_slice_width, and only state head 0 gets it.
        fixed = mode == "base_slice_fixed"
        width = min(config.base_slice_width, r, base.shape[1]) if fixed else min(r, base.shape[1])
        columns = base[:, :width].float()
        columns = columns / columns.norm(dim=0, keepdim=True).clamp_min(1e-12) * config.online_gain
        for state_head in range(1 if fixed else config.num_state_heads):
            head[:, state_head * r : state_head * r + width] = columns.to(head.dtype)

    # ----- PEFT contract -------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """δ-mem corrections depend on the memory at run time, so they cannot be folded into weights."""
        raise ValueError(
            "δ-mem adapters cannot be merged: the corrections come from an online memory, not a weight delta. "
            "Use unload() to get the base model back, or keep the PeftModel."
        )

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: list[str] | None):
        """Remove the projection hooks and return the untouched attention module (merging raises)."""
        if merge:
            self.merge()
        for handle in self._hook_handles.values():
            handle.remove()
        self._hook_handles = {}
        return self.base_layer

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name``'s parameters from this layer (PEFT's contract)."""
        self._forget_plans()
        super().delete_adapter(adapter_name)

    # ----- the per-adapter plan ------------------------------------------------------------------------------------
    def _forget_plans(self) -> None:
        self.__dict__.pop(_PLANS, None)

    def _plan(self, adapter: str) -> _Plan:
        """The adapter's :class:`_Plan`, built on first use."""
        plans = self.__dict__.setdefault(_PLANS, {})
        plan = plans.get(adapter)
        if plan is None:
            inputs = {
                name: container[adapter]
                for name, container in (
                    (_QUERY, self.deltamem_memory_q),
                    ("k", self.deltamem_memory_k),
                    ("v", self.deltamem_memory_v),
                    ("write_gate", self.deltamem_write_gate),
                    ("keep_gate", self.deltamem_keep_gate),
                )
                if adapter in container  # no keep gate when λ = 1 − β
            }
            heads = tuple(head for head in DELTA_HEADS if adapter in getattr(self, f"deltamem_delta_{head}"))
            config = self.deltamem_config[adapter]
            deltas = tuple(getattr(self, f"deltamem_delta_{head}")[adapter] for head in heads)
            o_norm = self.deltamem_delta_o_norm[adapter] if adapter in self.deltamem_delta_o_norm else None
            scale = self.deltamem_delta_scale[adapter] if adapter in self.deltamem_delta_scale else None
            plan = plans[adapter] = _Plan(
                config, inputs, heads, deltas, o_norm, scale, fused_plan(config, inputs, deltas, o_norm, scale)
            )
        return plan

    def _current_adapter(self) -> str | None:
        """The one active adapter present on this layer, None if adapters are off or absent here."""
        if self.disable_adapters:
            return None
        present = [name for name in self.active_adapters if name in self.deltamem_config]
        if len(present) > 1:
            raise ValueError(f"δ-mem runs one adapter at a time; active adapters are {present}. Use set_adapter(name).")
        return present[0] if present else None

    # ----- forward -------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Read (and write) the memory from the attention input, then run the base attention with corrections."""
        context: MemoryCallContext | None = kwargs.pop(CONTEXT_KWARG, None)
        adapter = self._current_adapter()
        if adapter is None:
            return self.base_layer(*args, **kwargs)
        if context is None:
            raise RuntimeError(
                f"δ-mem layer {self.memory_key!r} was called without its memory context. The model-level hook that "
                "provides it did not run, or this architecture does not pass **kwargs from the model to its "
                "attention modules."
            )
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if not context.read:
            # Write-only pass: no corrections, so the hidden states do not depend on the adapter; detaching them
            # keeps the backward pass out of the frozen backbone.
            self.memory_step(adapter, hidden_states.detach(), context)
            return self.base_layer(*args, **kwargs)
        corrections = None
        if fused_decode_enabled():  # one C++ call for a decoded token; None where it does not apply
            plan = self._plan(adapter)
            corrections = fused_step(plan.fused, plan.heads, self.memory_key, hidden_states, context)
        if corrections is None:
            corrections = self.corrections(adapter, self.memory_step(adapter, hidden_states, context))
        for head, delta in corrections.items():
            self._projections[head].__dict__[_PENDING_CORRECTION] = delta
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            for head in corrections:
                self._projections[head].__dict__.pop(_PENDING_CORRECTION, None)

    def memory_step(self, adapter: str, hidden_states: torch.Tensor, context: MemoryCallContext) -> torch.Tensor | None:
        """Memory reads o_t [B, T, n·r] for this call (None for a write-only call); the state after the call's writes
        goes to ``context``."""
        plan = self._plan(adapter)
        config = plan.config
        batch, length, _ = hidden_states.shape
        heads, r = config.num_state_heads, config.r
        x = _as_dtype(hidden_states, plan.inputs[_QUERY].weight.dtype)
        state = context.initial_state(self.memory_key).reshape(batch * heads, r, r)
        token_mask = context.token_mask  # [B·n, T]
        if heads > 1:
            token_mask = token_mask.repeat_interleave(heads, dim=0)
        # The scan's mask: None when every token is valid, which skips the masking ops (a mask of all True changes
        # nothing) at every layer and decoded token.
        scan_mask = None if context.all_valid else token_mask
        token_writes = context.write and config.write_granularity == "token"
        # One matmul projects every token for what this call does: the query if it reads, the write inputs if it
        # writes tokens (segment writes project segment means instead, below).
        wanted = ((_QUERY,) if context.read else ()) + (_WRITE_INPUTS if token_writes else ())
        projected = self._project(adapter, x, wanted) if wanted else {}
        q = self._fold(projected.pop(_QUERY), heads) if _QUERY in projected else None

        if token_writes:
            k, v, keep, erase, write, write_gate = self._write_inputs(adapter, projected)
            written_mask = token_mask
            if context.segment_ids is not None:  # tokens with id −1 (e.g. another role's) are read, never written
                keep, erase, write, written_mask = _skip_unwritten(
                    context.segment_ids, heads, token_mask, keep, erase, write
                )
            # A write-only call has no query: the scan's reads (from k) are discarded.
            reads, final_state = _scan(config, k if q is None else q, (k, v, keep, erase, write), state, scan_mask)
            context.record(self.memory_key, final_state.view(batch, heads, r, r), write_gate, written_mask)
        else:
            # Read-only, message and sentence calls: every token reads the memory as it was before the call.
            reads = None if q is None else self._read_only(state, q, scan_mask)
        if context.write and not token_writes:
            # message / sentence: one write per segment, from the mean hidden state of its valid tokens, segments in
            # id order.
            segment_means, segment_mask = self._segment_means(x, context)
            k, v, keep, erase, write, write_gate = self._write_inputs(
                adapter, self._project(adapter, segment_means, _WRITE_INPUTS)
            )
            segment_mask = segment_mask.repeat_interleave(heads, dim=0)
            _, final_state = _scan(config, k, (k, v, keep, erase, write), state, segment_mask)
            context.record(self.memory_key, final_state.view(batch, heads, r, r), write_gate, segment_mask)
        if not context.read:
            return None
        if heads == 1:  # [B, T, r] already
            return reads
        return reads.view(batch, heads, length, r).transpose(1, 2).reshape(batch, length, heads * r)

    @staticmethod
    def _fold(t: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, T, n·size] -> [B·n, T, size] in float32: state heads are folded into the operator's N."""
        if heads == 1:  # the fold is the identity (a view): skip its three view operations
            return _as_dtype(t, torch.float32)
        batch, length, width = t.shape
        return (
            _as_dtype(t, torch.float32)
            .view(batch, length, heads, width // heads)
            .transpose(1, 2)
            .reshape(batch * heads, length, -1)
        )

    @staticmethod
    def _read_only(state: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        reads = torch.einsum("nvk,ntk->ntv", state, q)
        return reads if mask is None else reads * mask.unsqueeze(-1)

    def _project(self, adapter: str, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """``x`` through the named memory input projections (W_mq, W_mk, W_mv, W_β, W_λ) in one matmul, by name.

        With ``normalize_qk`` the query and key come back as tanh then L2-normalised per state head (docs/design.md
        §1); they lead the stack, so both take one tanh and one normalisation.
        """
        plan = self._plan(adapter)
        modules = [plan.inputs[name] for name in names if name in plan.inputs]
        names = tuple(name for name in names if name in plan.inputs)
        out = _stacked_linear(modules, x)
        sizes = [m.out_features for m in modules]
        qk = sum(1 for name in names if name in (_QUERY, "k"))  # q and k come first in every stack
        if plan.config.normalize_qk and qk:
            width = sum(sizes[:qk])
            directions = _unit(torch.tanh(out[..., :width].unflatten(-1, (-1, plan.config.r))))
            parts = directions.flatten(-2).split(sizes[:qk], dim=-1) + out[..., width:].split(sizes[qk:], dim=-1)
        else:
            parts = out.split(sizes, dim=-1)
        return dict(zip(names, parts, strict=True))

    def _write_inputs(self, adapter: str, projected: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """k, v and the (keep, erase, write) coefficients of each write, plus β, all folded to [B·n, steps, ·],
        from the write inputs' projections (:meth:`_project`)."""
        config = self._plan(adapter).config
        heads = config.num_state_heads
        k = self._fold(projected["k"], heads)  # normalised by _project
        v = self._fold(projected["v"], heads)
        write_gate = torch.sigmoid(self._fold(projected["write_gate"], heads))  # β
        if config.couple_lambda:
            keep_gate = 1.0 - write_gate  # λ = 1 − β
        else:
            keep_gate = torch.sigmoid(self._fold(projected["keep_gate"], heads))
        keep, erase, write = state_update_gates(config.state_update_mode, write_gate, keep_gate)
        return k, v, keep, erase, write, write_gate

    @staticmethod
    def _segment_means(x: torch.Tensor, context: MemoryCallContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean hidden state per segment [B, M, H] and which segments exist per row [B, M] (ids in sorted order).

        Without segment ids the call's valid tokens form one segment.
        """
        ids = context.segment_ids
        valid = context.token_mask
        if ids is None:
            ids = torch.zeros_like(valid, dtype=torch.long)
        ids = torch.where(valid, ids.to(valid.device), torch.full_like(ids, -1, device=valid.device))
        unique = torch.unique(ids[ids >= 0])  # sorted: segments are written in id order
        one_hot = (ids.unsqueeze(-1) == unique.view(1, 1, -1)).to(x.dtype)  # [B, T, M]
        counts = one_hot.sum(dim=1)  # [B, M]
        means = torch.einsum("btm,bth->bmh", one_hot, x) / counts.clamp_min(1).unsqueeze(-1)
        return means, counts > 0

    def corrections(self, adapter: str, reads: torch.Tensor) -> dict[str, torch.Tensor]:
        """scale · W_Δ o_t for every active correction head, by head (q, k, v, o): one matmul for all heads, then the
        o head optionally RMS-normalised and each optionally scaled by its learned factor."""
        plan = self._plan(adapter)
        if not plan.deltas:
            return {}
        config = plan.config
        dtype = plan.deltas[0].weight.dtype
        if any(m.weight.dtype != dtype for m in plan.deltas):  # mixed precisions cannot share one matmul
            return self._scaled(plan, [m(reads.to(m.weight.dtype)) for m in plan.deltas])
        stacked = _stacked_linear(list(plan.deltas), _as_dtype(reads, dtype))
        sizes = [m.out_features for m in plan.deltas]
        if plan.o_norm is None and plan.scale is None:
            # One constant scale for every head: one multiply for the stack (the same numbers, per element).
            return dict(zip(plan.heads, (stacked * config.scale).split(sizes, dim=-1), strict=True))
        return self._scaled(plan, stacked.split(sizes, dim=-1))

    @staticmethod
    def _scaled(plan: _Plan, raw: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The heads' raw corrections W_Δ o_t, the o head optionally RMS-normalised, each times its scale."""
        config, out = plan.config, {}
        for head, delta in zip(plan.heads, raw, strict=True):
            if head == "o" and plan.o_norm is not None:
                rms = torch.rsqrt(delta.float().pow(2).mean(-1, keepdim=True) + config.delta_o_rmsnorm_eps)
                delta = (delta.float() * rms).to(delta.dtype) * plan.o_norm
            scale = config.scale
            if plan.scale is not None:
                index = DELTA_HEADS.index(head) if plan.scale.numel() > 1 else 0
                scale = scale * torch.sigmoid(plan.scale[index]) * config.delta_scale_max
            out[head] = delta * scale
        return out

    def __repr__(self) -> str:
        return "deltamem." + super().__repr__()


def _skip_unwritten(ids: torch.Tensor, heads: int, token_mask: torch.Tensor, keep, erase, write) -> tuple:
    """Token writes with segment ids: a token whose id is −1 (another role's, say) takes the identity step (keep 1,
    erase 0, write 0), so it reads the memory but leaves it unchanged. Returns the gates and the mask of the tokens
    written ([B·n, T], for the write-gate statistics)."""
    written = (ids.ne(-1).repeat_interleave(heads, dim=0) if heads > 1 else ids.ne(-1)) & token_mask
    flags = written.unsqueeze(-1)
    return torch.where(flags, keep, torch.ones_like(keep)), erase * flags, write * flags, written


def _scan(config: DeltaMemConfig, q: torch.Tensor, writes: tuple, state: torch.Tensor, mask: torch.Tensor):
    """``delta_rule_scan`` with the adapter's scan settings; ``writes`` is ``(k, v, keep, erase, write)``."""
    return delta_rule_scan(q, *writes, state, mask, impl=config.scan_impl, chunk_size=config.scan_chunk_size)
