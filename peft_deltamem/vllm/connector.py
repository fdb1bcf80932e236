"""The δ-mem KV connector: a request starts from a saved memory and leaves its final memory in a file.

vLLM has no request field for an initial recurrent state; its KV-transfer connector interface carries per-request
``kv_transfer_params`` (:mod:`.requests`) to a scheduler-side and a worker-side object, which is enough:

- scheduler side: when a request gets its state slots (new, or resumed after a preemption, which recomputes it from
  its start), the memory it names is scheduled to load into them before that step's forward; every step tells the
  workers which slots are read-only or have unwritten prompt positions; when the request finishes, its slots are
  saved. A request that ends by its length (``max_tokens``: every history write) is saved in the very step that
  produces its last token, before vLLM hands back its answer; one that ends otherwise (a stop token) keeps its
  slots until the worker has saved them in the next step, and :func:`.requests.wait_for_saved_memory` waits for
  the file.
- worker side: loads memory files into the slots of this step's new requests, answers the memory layers'
  questions about this step's requests, and saves finished requests' slots as :class:`peft_deltamem.MemoryState`
  files (atomically; only tensor-parallel rank 0 writes).

Configure it with :func:`.requests.kv_transfer_config`. The final memory covers the prompt and every generated token
but the last (which is never fed through the model), as ``PeftModel.generate(memory=...)`` leaves it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from ..memory.state import MemoryLayout, MemoryState
from . import requests as keys
from .layer import DeltaMemStateLayer, StepRequests

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


@dataclass
class _Transfer:
    req_id: str
    slots: dict[int, int]  # kv-cache group -> state slot
    path: str


@dataclass
class DeltaMemConnectorMetadata(KVConnectorMetadata):
    """One step's work for the workers."""

    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)  # finished requests (their slots are kept until saved)
    early_saves: list[_Transfer] = field(default_factory=list)  # requests whose last token this step produces
    read_only: dict[int, set[int]] = field(default_factory=dict)  # group -> slots
    unwritten: dict[int, dict[int, list[tuple[int, int]]]] = field(default_factory=dict)  # group -> slot -> ranges
    # Set by the worker once it has loaded `loads` into their slots: a load applied twice would undo the step's
    # writes. On the object itself, not by id(): a step's metadata is a new object whose id may be the freed
    # previous one's, which skipped that step's loads (the request then started from a stale slot).
    loads_applied: bool = False


@dataclass
class _Active:
    request: Any
    params: dict
    slots: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    early_saved_at: int | None = None  # num_output_tokens the request will have when the early save is right
    starts: int = 0  # times the request got state slots: 1, plus one per resumption after a preemption


class DeltaMemConnector(KVConnectorBase_V1, SupportsHMA):
    """Per-request δ-mem memory in and out of vLLM (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        hf_config = vllm_config.model_config.hf_config
        section = getattr(hf_config, "deltamem", None) or {}
        self._adapter_config = dict(section.get("adapter_config", {}))
        self._memory_keys = [key for _, key in sorted((int(i), k) for i, k in section.get("layers", {}).items())]
        # The kv-cache group of every δ-mem state layer (all share one group unless only some layers are adapted).
        self._groups: dict[str, int] = {}
        for group_id, group in enumerate(kv_cache_config.kv_cache_groups if kv_cache_config else []):
            for name in group.layer_names:
                if name.endswith(".deltamem"):
                    self._groups[name] = group_id
        self._state_groups = sorted(set(self._groups.values()))
        # scheduler side
        self._active: dict[str, _Active] = {}
        self._pending_loads: list[_Transfer] = []
        self._pending_saves: list[_Transfer] = []
        # worker side
        self._layers: list[DeltaMemStateLayer] | None = None
        self._bound: DeltaMemConnectorMetadata | None = None
        self._step: dict[int, StepRequests] = {}
        self._saved: set[str] = set()

    # ================================================================================================================
    # scheduler side
    # ================================================================================================================
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False  # the memory is not KV: no tokens are skipped

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = dict(request.kv_transfer_params or {})
        if not any(key.startswith("deltamem_") for key in params):
            return
        block_ids = blocks.get_block_ids()
        slots = {g: block_ids[g][0] for g in self._state_groups if g < len(block_ids) and block_ids[g]}
        active = self._active.get(request.request_id)
        if active is None:
            active = self._active[request.request_id] = _Active(request=request, params=params)
            active.error = _check_memory_file(params.get(keys.LOAD), self._memory_keys, self._adapter_config)
            if active.error:
                logger.error("δ-mem: request %s: %s; it runs from an empty memory", request.request_id, active.error)
        # New, or resumed after a preemption (recomputed from its start in new slots): start from its memory again.
        active.slots = slots
        active.early_saved_at = None
        active.starts += 1
        if params.get(keys.LOAD) and not active.error:
            self._pending_loads.append(_Transfer(request.request_id, slots, params[keys.LOAD]))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = DeltaMemConnectorMetadata(loads=self._pending_loads, saves=self._pending_saves)
        self._pending_loads, self._pending_saves = [], []
        if meta.loads:
            # The loads feed this step's forward: vLLM starts them before it (see kv_connector_model_runner_mixin).
            scheduler_output.has_sync_kv_loads = True
        scheduled = scheduler_output.num_scheduled_tokens
        for req_id, active in self._active.items():
            if req_id not in scheduled or not active.slots:
                continue
            params = active.params
            for group, slot in active.slots.items():
                if params.get(keys.READ_ONLY):
                    meta.read_only.setdefault(group, set()).add(slot)
                elif params.get(keys.UNWRITTEN):
                    meta.unwritten.setdefault(group, {})[slot] = [tuple(r) for r in params[keys.UNWRITTEN]]
            if params.get(keys.SAVE) and _ends_by_length_this_step(active.request, scheduled[req_id]):
                meta.early_saves.append(_Transfer(req_id, dict(active.slots), params[keys.SAVE]))
                active.early_saved_at = active.request.num_output_tokens + 1
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        active = self._active.pop(request.request_id, None)
        if active is None:
            return False, None
        reply: dict[str, Any] = {keys.STARTS: active.starts}
        if active.error:
            reply[keys.ERROR] = active.error
        path = active.params.get(keys.SAVE)
        if not path or not active.slots:
            return False, reply
        reply.update({keys.SAVED: path, keys.SAVE_ID: request.request_id})
        if active.early_saved_at is not None and active.early_saved_at == request.num_output_tokens:
            return False, reply  # saved in the step that produced the last token
        self._pending_saves.append(_Transfer(request.request_id, dict(active.slots), path))
        return True, reply  # keep the slots until a worker has saved them (get_finished)

    # ================================================================================================================
    # worker side
    # ================================================================================================================
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._bound = connector_metadata if isinstance(connector_metadata, DeltaMemConnectorMetadata) else None
        self._step = {}

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._bound, self._step = None, {}

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._apply_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        meta = self._bound
        if meta is None:
            return
        for transfer in meta.early_saves:
            self._save(transfer)
        for transfer in meta.saves:
            self._save(transfer)
            self._saved.add(transfer.req_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._saved = self._saved, set()
        return (done or None), None

    def step_requests(self, layer_name: str) -> StepRequests:
        """What this step's requests need from memory layer ``layer_name``: loaded, read-only and unwritten slots."""
        meta = self._bound
        if meta is None:
            return StepRequests()
        self._apply_loads()  # normally done already (sync loads run before the forward)
        group = self._groups.get(layer_name, 0)
        step = self._step.get(group)
        if step is None:
            step = self._step[group] = StepRequests(
                loaded={t.slots[group] for t in meta.loads if group in t.slots},
                read_only=meta.read_only.get(group, set()),
                unwritten=meta.unwritten.get(group, {}),
            )
        return step

    # ----- helpers ---------------------------------------------------------------------------------------------------
    def _state_layers(self) -> list[DeltaMemStateLayer]:
        if self._layers is None:
            context = self._vllm_config.compilation_config.static_forward_context
            found = [layer for layer in context.values() if isinstance(layer, DeltaMemStateLayer)]
            self._layers = sorted(found, key=lambda layer: _layer_index(layer.prefix))
        return self._layers

    def _apply_loads(self) -> None:
        meta = self._bound
        if meta is None or not meta.loads or meta.loads_applied:
            return
        meta.loads_applied = True
        for transfer in meta.loads:
            memory = MemoryState.load(transfer.path)
            for layer in self._state_layers():
                group = self._groups.get(layer.prefix, 0)
                state = memory.states[layer.memory_key][0]
                layer.state[transfer.slots[group]] = state.to(layer.state.device, torch.float32)

    def _save(self, transfer: _Transfer) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank

        if get_tensor_model_parallel_rank() != 0:
            return
        layers = self._state_layers()
        keys_present = [layer.memory_key for layer in layers]
        if keys_present != self._memory_keys:
            raise RuntimeError(
                "δ-mem: this worker holds only some of the adapted layers (pipeline parallel?), so it cannot save a "
                "whole memory; pipeline parallelism is not supported with per-request memory."
            )
        first = layers[0].config
        memory = MemoryState()
        memory.layout = MemoryLayout(first.r, first.num_state_heads, tuple(keys_present))
        memory.adapter_config = dict(self._adapter_config)
        memory.states = {
            layer.memory_key: layer.state[transfer.slots[self._groups.get(layer.prefix, 0)]].detach().unsqueeze(0).cpu()
            for layer in layers
        }
        memory.save(transfer.path, extra_metadata={keys.HEADER_SAVE_ID: transfer.req_id})


def _ends_by_length_this_step(request: Request, num_scheduled: int) -> bool:
    """Whether this step feeds the request's last unfed token and the token it samples is its last (max_tokens)."""
    params = request.sampling_params
    if params is None or params.max_tokens is None:
        return False
    feeds_all = request.num_computed_tokens + num_scheduled >= request.num_tokens
    return feeds_all and request.num_output_tokens + 1 >= params.max_tokens


def _layer_index(prefix: str) -> int:
    match = re.search(r"\.layers\.(\d+)\.", prefix + ".")
    return int(match.group(1)) if match else -1


def _check_memory_file(path: str | None, layers: list[str], adapter_config: dict) -> str | None:
    """Why the memory file at ``path`` cannot start a request of this engine, or None if it can."""
    if not path:
        return None
    try:
        memory = MemoryState.load(path)
    except (OSError, ValueError) as err:
        return f"cannot load the memory {path}: {err}"
    if memory.layout is None or list(memory.layout.layers) != layers:
        return f"the memory {path} belongs to another adapter (its layers differ from this engine's)"
    for name in ("r", "num_state_heads"):
        if adapter_config.get(name) is not None and getattr(memory.layout, name) != adapter_config[name]:
            return f"the memory {path} has {name}={getattr(memory.layout, name)}, the adapter {adapter_config[name]}"
    if memory.batch_size != 1:
        return f"the memory {path} holds {memory.batch_size} rows; a request starts from one"
    return None
