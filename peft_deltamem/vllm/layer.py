"""The δ-mem memory layer inside vLLM: per-request r×r states in vLLM's recurrent-state cache (docs/design.md §1, §9).

One :class:`DeltaMemStateLayer` sits in each adapted attention module. vLLM treats it like a linear-attention layer
(``MambaBase`` with the ``LINEAR`` backend): every request owns one state slot of shape [n, r, r] (float32) per
layer, found in column 0 of its block table; the metadata lists the batch's requests, decodes first. Per step the
layer reads its requests' states, runs the memory over the step's tokens, writes the states back and returns the
reads o_t, from which the attention adds its corrections.

The math is this package's: the projections, gates and corrections are :class:`peft_deltamem.layer.DeltaMemAttention`'s
own methods, and the recurrence is :func:`peft_deltamem.ops.delta_rule_scan` (the chunked scan for prefill chunks,
the single step for decodes), read before write, from each request's state.

Per request the KV connector (:mod:`.connector`) may say: the slot was just loaded from a saved memory (so a new
sequence does not start from zero), the request is read-only (every token reads the memory it started with, nothing is
written), or some prompt positions are read but not written. A masked write is the identity step (keep 1, erase 0,
write 0), so every case runs through the same scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import ForwardContext, get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..config import DELTA_HEADS, DeltaMemConfig
from ..layer import _QUERY, _WRITE_INPUTS, DeltaMemAttention
from ..ops import delta_rule_scan

ADAPTER = "default"


@dataclass
class StepRequests:
    """What the connector says about this step's requests, by state slot (see :meth:`DeltaMemConnector.step_requests`)."""

    loaded: set[int] = field(default_factory=set)  # slots filled from a saved memory before this step
    read_only: set[int] = field(default_factory=set)
    unwritten: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # slot -> [start, end) positions


_NOTHING = StepRequests()


def _step_requests(layer_name: str) -> StepRequests:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return _NOTHING
    connector = get_kv_transfer_group()
    ask = getattr(connector, "step_requests", None)
    return _NOTHING if ask is None else ask(layer_name)


class DeltaMemStateLayer(nn.Module, MambaBase):
    """The memory of one adapted attention layer: the adapter's weights (named as PEFT names them) and a state slot
    per request.

    ``out_features``: the local output width of each correction head (q, k, v, o) on this tensor-parallel rank.
    """

    # DeltaMemAttention's math, reused as is: these methods only touch the deltamem_* containers and the config.
    _plan = DeltaMemAttention._plan
    _project = DeltaMemAttention._project
    _write_inputs = DeltaMemAttention._write_inputs
    _fold = staticmethod(DeltaMemAttention._fold)
    corrections = DeltaMemAttention.corrections
    _scaled = staticmethod(DeltaMemAttention._scaled)
    adapter_layer_names = DeltaMemAttention.adapter_layer_names

    def __init__(
        self,
        config: DeltaMemConfig,
        hidden_size: int,
        out_features: dict[str, int],
        *,
        prefix: str,
        memory_key: str,
        row_shards: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        if config.write_granularity != "token":
            raise ValueError(
                f"δ-mem on vLLM supports token writes only; this adapter writes by {config.write_granularity!r}."
            )
        self.prefix = prefix
        self.memory_key = memory_key
        self.deltamem_config = {ADAPTER: config}
        factory = {"dtype": torch.float32}
        d, gates = config.num_state_heads * config.r, config.num_state_heads * config.gate_width
        for name in self.adapter_layer_names:
            container = nn.ParameterDict() if name in ("deltamem_delta_o_norm", "deltamem_delta_scale") else None
            setattr(self, name, container if container is not None else nn.ModuleDict())
        self.deltamem_memory_q[ADAPTER] = nn.Linear(hidden_size, d, bias=False, **factory)
        self.deltamem_memory_k[ADAPTER] = nn.Linear(hidden_size, d, bias=False, **factory)
        self.deltamem_memory_v[ADAPTER] = nn.Linear(hidden_size, d, bias=False, **factory)
        self.deltamem_write_gate[ADAPTER] = nn.Linear(hidden_size, gates, bias=True, **factory)
        if not config.couple_lambda:
            self.deltamem_keep_gate[ADAPTER] = nn.Linear(hidden_size, gates, bias=True, **factory)
        for head in config.delta_heads:
            delta = nn.Linear(d, out_features[head], bias=False, **factory)
            shard = (row_shards or {}).get(head)
            if shard is not None:  # tensor parallel: this rank holds rows [start, start + size) of the full head
                delta.weight.weight_loader = _row_shard_loader(*shard)
            getattr(self, f"deltamem_delta_{head}")[ADAPTER] = delta
        if "o" in config.delta_heads and config.delta_o_rmsnorm:
            self.deltamem_delta_o_norm[ADAPTER] = nn.Parameter(torch.ones(out_features["o"], **factory))
        if config.trainable_delta_scale:
            n_scales = len(DELTA_HEADS) if config.delta_scale_granularity == "head" else 1
            raw = math.log(config.delta_scale_init / (config.delta_scale_max - config.delta_scale_init))
            self.deltamem_delta_scale[ADAPTER] = nn.Parameter(torch.full((n_scales,), raw, **factory))

        vllm_config = get_current_vllm_config()
        compilation_config = vllm_config.compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]),)
        self.model_config = vllm_config.model_config
        self.cache_config = vllm_config.cache_config

    # ----- vLLM's state-layer contract -------------------------------------------------------------------------------
    @property
    def config(self) -> DeltaMemConfig:
        return self.deltamem_config[ADAPTER]

    def get_state_shape(self) -> tuple[tuple[int, int, int]]:
        return (state_shape(self.config),)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (torch.float32,)  # the memory is float32 whatever the model dtype (docs/design.md §1)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        # The linear-attention backend's metadata is all this layer needs: slots, query starts, sequence lengths.
        return MambaAttentionBackendEnum.LINEAR

    @property
    def state(self) -> torch.Tensor:
        """The state cache of this layer: [num_slots, n, r, r] float32."""
        return self.kv_cache[0]

    # ----- forward ---------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """The corrections (scale · W_Δ o_t) of this step's tokens, by head; the states advance by the step's writes."""
        reads = torch.empty(
            hidden_states.shape[0],
            self.config.num_state_heads * self.config.r,
            dtype=torch.float32,
            device=hidden_states.device,
        )
        torch.ops.vllm.deltamem_memory(hidden_states, reads, self.prefix)
        return self.corrections(ADAPTER, reads)

    def memory_step(self, hidden_states: torch.Tensor, reads: torch.Tensor) -> None:
        """Fill ``reads`` [tokens, n·r] for this step's tokens and advance the requests' states (the custom op's body)."""
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        reads.zero_()
        if metadata is None:  # the profiling run: no states, reads of an empty memory
            return
        num_reqs = metadata.num_decodes + metadata.num_prefills
        if num_reqs == 0:
            return
        starts = metadata.query_start_loc[: num_reqs + 1].tolist()
        seq_lens = metadata.seq_lens[:num_reqs].tolist()
        slots = metadata.state_indices_tensor[:num_reqs].tolist()
        step = _step_requests(self.prefix)
        rows = [i for i in range(num_reqs) if slots[i] >= 0 and starts[i + 1] > starts[i]]
        # Decodes (one token) run as one batched single step, longer chunks as one padded chunked scan.
        single = [i for i in rows if starts[i + 1] - starts[i] == 1]
        longer = [i for i in rows if starts[i + 1] - starts[i] > 1]
        for group in (single, longer):
            if group:
                self._run(group, hidden_states, reads, starts, seq_lens, slots, step)

    def _run(self, rows, hidden_states, reads, starts, seq_lens, slots, step: StepRequests) -> None:
        config = self.config
        heads, r = config.num_state_heads, config.r
        device = hidden_states.device
        lengths = [starts[i + 1] - starts[i] for i in rows]
        width = max(lengths)
        offsets = torch.arange(width, device=device)
        begin = torch.tensor([starts[i] for i in rows], device=device)
        length = torch.tensor(lengths, device=device)
        mask = offsets.unsqueeze(0) < length.unsqueeze(1)  # [R, T]
        index = torch.where(mask, begin.unsqueeze(1) + offsets, begin.unsqueeze(1))  # padding gathers a valid row
        x = hidden_states[index].to(self.deltamem_memory_q[ADAPTER].weight.dtype)  # [R, T, H]

        # Which tokens write: all valid ones, except read-only requests and unwritten prompt positions.
        writes = mask.clone()
        for row, i in enumerate(rows):
            slot = slots[i]
            if slot in step.read_only:
                writes[row] = False
            elif slot in step.unwritten:
                first = seq_lens[i] - lengths[row]  # position of this chunk's first token in its sequence
                for a, b in step.unwritten[slot]:
                    lo, hi = max(a - first, 0), min(b - first, lengths[row])
                    if lo < hi:
                        writes[row, lo:hi] = False

        slot_index = torch.tensor([slots[i] for i in rows], device=device, dtype=torch.long)
        state = self.state[slot_index].clone()  # [R, n, r, r]
        fresh = [row for row, i in enumerate(rows) if seq_lens[i] == lengths[row] and slots[i] not in step.loaded]
        if fresh:  # a new sequence starts from an empty memory unless the connector loaded one into its slot
            state[fresh] = 0.0

        projected = self._project(ADAPTER, x, (_QUERY, *_WRITE_INPUTS))
        q = self._fold(projected.pop(_QUERY), heads)  # normalised by _project
        k, v, keep, erase, write, _ = self._write_inputs(ADAPTER, projected)
        if not bool(writes.all()):
            # A token that is read but not written is the identity step: keep 1, erase 0, write 0.
            w = writes.repeat_interleave(heads, dim=0).unsqueeze(-1)
            keep = torch.where(w, keep, torch.ones_like(keep))
            erase = torch.where(w, erase, torch.zeros_like(erase))
            write = torch.where(w, write, torch.zeros_like(write))
        token_mask = mask.repeat_interleave(heads, dim=0) if heads > 1 else mask
        out, final = delta_rule_scan(
            q,
            k,
            v,
            keep,
            erase,
            write,
            state.reshape(len(rows) * heads, r, r),
            token_mask,
            impl=config.scan_impl,
            chunk_size=config.scan_chunk_size,
        )
        out = out.view(len(rows), heads, width, r).transpose(1, 2).reshape(len(rows), width, heads * r)
        reads[index[mask]] = out[mask].to(reads.dtype)
        self.state[slot_index] = final.view(len(rows), heads, r, r)


def state_shape(config: DeltaMemConfig) -> tuple[int, int, int]:
    """The per-request state of one layer: [n, r, r]."""
    return (config.num_state_heads, config.r, config.r)


def _row_shard_loader(start: int, size: int):
    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(0, start, size).to(param.dtype))

    return load


def deltamem_memory(hidden_states: torch.Tensor, reads: torch.Tensor, layer_name: str) -> None:
    """The memory step of layer ``layer_name`` as a custom op, so that it runs eagerly inside compiled graphs."""
    forward_context: ForwardContext = get_forward_context()
    forward_context.no_compile_layers[layer_name].memory_step(hidden_states, reads)


def _deltamem_memory_fake(hidden_states: torch.Tensor, reads: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(
    op_name="deltamem_memory",
    op_func=deltamem_memory,
    mutates_args=["reads"],
    fake_impl=_deltamem_memory_fake,
)
