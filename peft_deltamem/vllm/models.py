"""vLLM's Llama and Qwen3 with a δ-mem memory in each adapted attention layer.

The models, attention kernels, KV cache and weights are vLLM's own; each adapted attention module gains a
:class:`~peft_deltamem.vllm.layer.DeltaMemStateLayer` (``self_attn.deltamem``) and adds its corrections where
:class:`peft_deltamem.layer.DeltaMemAttention` adds them: Δq/Δk/Δv on the projection outputs, before Qwen3's q/k
norms and before RoPE; Δo on the output projection's output. The memory reads the attention's input (after the
decoder layer's input norm), before the attention runs.

The checkpoint's ``config.json`` (written by ``deltamem export-vllm``) carries a ``deltamem`` section: the adapter
configuration and the adapted layers. The models are "hybrid" for vLLM (attention + a recurrent state per request).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

from ..config import DeltaMemConfig
from .layer import DeltaMemStateLayer, state_shape

CONFIG_KEY = "deltamem"


def deltamem_section(hf_config) -> dict:
    section = getattr(hf_config, CONFIG_KEY, None)
    if not section:
        raise ValueError(
            "This checkpoint has no 'deltamem' section in its config.json: make it with `deltamem export-vllm`."
        )
    return section


def adapter_config(hf_config) -> DeltaMemConfig:
    """The adapter configuration recorded in the checkpoint's config."""
    record = dict(deltamem_section(hf_config)["adapter_config"])
    fields = DeltaMemConfig.__dataclass_fields__
    kwargs = {k: v for k, v in record.items() if k in fields and k not in ("peft_type", "task_type", "auto_mapping")}
    return DeltaMemConfig(**kwargs)


def _layer_index(prefix: str) -> int:
    match = re.search(r"\.layers\.(\d+)\.", prefix + ".")
    if match is None:
        raise ValueError(f"cannot find the layer index in {prefix!r}")
    return int(match.group(1))


def _attach(attention: nn.Module, prefix: str) -> None:
    """Give ``attention`` (vLLM's Llama / Qwen3 attention, built) its memory layer if the adapter adapts it."""
    hf_config = get_current_vllm_config().model_config.hf_config
    section = deltamem_section(hf_config)
    layers = {int(i): key for i, key in section["layers"].items()}
    index = _layer_index(prefix)
    attention.deltamem = None
    if index not in layers:
        return
    config = adapter_config(hf_config)
    tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    head_dim = attention.head_dim
    # Local widths of each correction on this rank (q/k/v are column-parallel; o's output is the full hidden size).
    kv_replicas = max(1, tp_size // attention.total_num_kv_heads)
    kv_rank = tp_rank // kv_replicas
    out = {
        "q": attention.q_size,
        "k": attention.kv_size,
        "v": attention.kv_size,
        "o": attention.hidden_size,
    }
    shards = None
    if tp_size > 1:
        shards = {
            "q": (tp_rank * attention.q_size, attention.q_size),
            "k": (kv_rank * attention.num_kv_heads * head_dim, attention.kv_size),
            "v": (kv_rank * attention.num_kv_heads * head_dim, attention.kv_size),
        }
    attention.deltamem = DeltaMemStateLayer(
        config,
        attention.hidden_size,
        out,
        prefix=f"{prefix}.deltamem",
        memory_key=layers[index],
        row_shards=shards,
    )


def _add(x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return x if delta is None else x + delta.to(x.dtype)


def _corrected_qkv(
    attention: nn.Module, hidden_states: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory's corrections for this step (the memory reads and writes here, before the attention) and the q, k,
    v projections with Δq/Δk/Δv added; what follows (Qwen3's q/k norms, RoPE) is the caller's."""
    delta = attention.deltamem(hidden_states)
    qkv, _ = attention.qkv_proj(hidden_states)
    q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
    return delta, _add(q, delta.get("q")), _add(k, delta.get("k")), _add(v, delta.get("v"))


def _corrected_output(
    attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: dict[str, torch.Tensor]
) -> torch.Tensor:
    """vLLM's attention over the (rotated) q, k, v, its output projection, and Δo added to that projection's output."""
    output, _ = attention.o_proj(attention.attn(q, k, v))
    return _add(output, delta.get("o"))


# ----- Llama family -----------------------------------------------------------------------------------------------
class DeltaMemLlamaAttention(LlamaAttention):
    """vLLM's Llama attention with δ-mem corrections."""

    def __init__(self, *args, prefix: str = "", **kwargs) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        _attach(self, prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.deltamem is None:
            return super().forward(positions, hidden_states)
        delta, q, k, v = _corrected_qkv(self, hidden_states)
        q, k = self.rotary_emb(positions, q, k)
        return _corrected_output(self, q, k, v, delta)


class DeltaMemLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config, prefix, config, attn_layer_type=DeltaMemLlamaAttention)


class _HybridMixin:
    """vLLM's hybrid-model interface (``IsHybrid``): one float32 [n, r, r] state per adapted layer and request."""

    is_hybrid = True

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int, int]]:
        return (state_shape(adapter_config(vllm_config.model_config.hf_config)),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype]:
        return (torch.float32,)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()


class DeltaMemLlamaForCausalLM(_HybridMixin, LlamaForCausalLM):
    """Llama, Mistral, SmolLM2 (any checkpoint vLLM serves with ``LlamaForCausalLM``) with δ-mem."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=DeltaMemLlamaDecoderLayer)


# ----- Qwen3 ------------------------------------------------------------------------------------------------------
class DeltaMemQwen3Attention(Qwen3Attention):
    """vLLM's Qwen3 attention with δ-mem corrections (Δq, Δk before the q/k norms and RoPE)."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.deltamem is None:
            return super().forward(positions, hidden_states)
        delta, q, k, v = _corrected_qkv(self, hidden_states)
        q_by_head = self.q_norm(q.view(*q.shape[:-1], q.shape[-1] // self.head_dim, self.head_dim))
        q = q_by_head.view(q.shape)
        k_by_head = self.k_norm(k.view(*k.shape[:-1], k.shape[-1] // self.head_dim, self.head_dim))
        k = k_by_head.view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return _corrected_output(self, q, k, v, delta)


class DeltaMemQwen3DecoderLayer(Qwen3DecoderLayer):
    def __init__(self, *args, prefix: str = "", **kwargs) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        # Qwen3's decoder layer builds its attention itself: give that module δ-mem's forward and its memory layer.
        self.self_attn.__class__ = DeltaMemQwen3Attention
        _attach(self.self_attn, f"{prefix}.self_attn")


class DeltaMemQwen3Model(Qwen3Model):
    decoder_layer_type = DeltaMemQwen3DecoderLayer


class DeltaMemQwen3ForCausalLM(_HybridMixin, Qwen3ForCausalLM):
    """Qwen3 with δ-mem."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # Qwen3ForCausalLM builds Qwen3Model by name; build the δ-mem model in its place.
        import vllm.model_executor.models.qwen3 as qwen3

        original = qwen3.Qwen3Model
        qwen3.Qwen3Model = DeltaMemQwen3Model
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            qwen3.Qwen3Model = original
