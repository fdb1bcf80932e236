"""`MemoryState`: the online memory as an explicit object (docs/design.md §3).

The memory owns its lifecycle: it is sized by its first call (:meth:`MemoryState._bind`), advanced by a call's writes
(:meth:`MemoryState.commit`), and its rows follow the batch (:meth:`MemoryState.select_rows_`); nothing outside
:mod:`peft_deltamem.memory` touches its fields.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._io import atomic_path

_FORMAT = "peft_deltamem.memory"
_VERSION = 1


@dataclass(frozen=True)
class MemoryLayout:
    """What a memory must look like to fit an adapter: rank, state heads and the adapted layers' names."""

    r: int
    num_state_heads: int
    layers: tuple[str, ...]

    def describe(self) -> str:
        """A short human-readable description used in error messages."""
        return f"r={self.r}, num_state_heads={self.num_state_heads}, {len(self.layers)} layers"


class MemoryState:
    """One δ-mem memory per sequence of a batch: per adapted layer a float32 tensor [B, n, r, r].

    ``MemoryState()`` is empty and is sized on first use. Pass it as ``model(..., memory=mem)`` or
    ``model.generate(..., memory=mem)``: the call reads it and advances it in place by that call's writes
    (``memory_write=False`` makes a call read-only). Without ``memory=`` a call starts from an empty memory and keeps
    nothing.

    ``adapter_config`` records the configuration of the adapter the memory belongs to; it is saved with the memory.
    """

    def __init__(self) -> None:
        self.layout: MemoryLayout | None = None
        self.states: dict[str, torch.Tensor] = {}
        self.adapter_config: dict = {}
        # Filled by a call with memory_record_write_gates=True: per layer (β [B·n, steps, g], written [B·n, steps]),
        # still attached to the graph, e.g. for a write-sparsity penalty. Not saved, not copied.
        self._write_gates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----- shape ---------------------------------------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        """True until the memory is sized by a first use (or after :meth:`reset`)."""
        return self.layout is None

    @property
    def batch_size(self) -> int | None:
        """Number of sequences (rows) the memory holds, or None while empty."""
        return next(iter(self.states.values())).shape[0] if self.states else None

    def _bind(self, layout: MemoryLayout, batch_size: int, device: torch.device, adapter_config: dict) -> None:
        """Size an empty memory for ``layout``, or check that a sized one fits it; raises ``ValueError`` if not."""
        if self.layout is None:
            shape = (batch_size, layout.num_state_heads, layout.r, layout.r)
            self.states = {name: torch.zeros(shape, dtype=torch.float32, device=device) for name in layout.layers}
            self.layout = layout
            self.adapter_config = dict(adapter_config)
            return
        if self.layout != layout:
            raise ValueError(
                f"This MemoryState was made for an adapter with {self.layout.describe()} but is used with one with "
                f"{layout.describe()}{_layer_diff(self.layout.layers, layout.layers)}. "
                "Use a fresh MemoryState() (or mem.reset()) with this adapter."
            )
        if self.batch_size != batch_size:
            raise ValueError(
                f"This MemoryState holds {self.batch_size} sequences but the call has a batch of {batch_size}. "
                "Use one memory row per batch row: select rows with mem[indices] or start a fresh MemoryState()."
            )

    # ----- lifetime ------------------------------------------------------------------------------------------------
    def reset(self) -> MemoryState:
        """Forget everything: the memory becomes empty and is sized again on its next use."""
        self.layout, self.states, self.adapter_config = None, {}, {}
        self._write_gates = {}
        return self

    def commit(self, states: Mapping[str, torch.Tensor]) -> None:
        """Take the layers' states after a call's writes (the model-level hook calls this once the call has ended)."""
        unknown = set(states) - set(self.states)
        if unknown:
            raise KeyError(f"commit: layers {sorted(unknown)} are not in this memory")
        self.states.update(states)

    def record_write_gates(self, gates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a call's write gates (``memory_record_write_gates=True``), replacing those of an earlier call."""
        self._write_gates = dict(gates)

    @property
    def last_write_gates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The write gates of the last call that recorded them: per layer (β [B·n, steps, g], written [B·n, steps]),
        still attached to the graph (e.g. for a write-sparsity penalty). Not saved, not copied; a copy of the dict."""
        return dict(self._write_gates)

    def take_write_gates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:attr:`last_write_gates`, forgotten by the memory (so their graph can be freed)."""
        gates, self._write_gates = self._write_gates, {}
        return gates

    def replace_with(self, other: MemoryState) -> None:
        """Become ``other`` (layout, states and adapter config), in place: e.g. a working copy after generation."""
        self.layout, self.states, self.adapter_config = other.layout, other.states, dict(other.adapter_config)

    def select_rows_(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) the given batch rows in place, e.g. to follow beam search."""
        self.states = {k: v.index_select(0, rows.to(v.device)) for k, v in self.states.items()}

    def zeros_like(self) -> MemoryState:
        """A memory of the same adapter and batch size with nothing written (all states zero)."""
        return self._with_states({k: torch.zeros_like(v) for k, v in self.states.items()})

    def _with_states(self, states: dict[str, torch.Tensor]) -> MemoryState:
        other = MemoryState()
        other.layout, other.states, other.adapter_config = self.layout, states, dict(self.adapter_config)
        return other

    def clone(self) -> MemoryState:
        """An independent copy (gradients still flow through the copy)."""
        return self._with_states({k: v.clone() for k, v in self.states.items()})

    def detach(self) -> MemoryState:
        """A copy cut from the autograd graph (e.g. between truncated-BPTT segments)."""
        return self._with_states({k: v.detach() for k, v in self.states.items()})

    def to(self, *args, **kwargs) -> MemoryState:
        """Move the memory like ``Tensor.to``; the dtype always stays float32."""
        moved = {k: v.to(*args, **kwargs) for k, v in self.states.items()}
        return self._with_states({k: v.float() for k, v in moved.items()})

    def __getitem__(self, rows: int | slice | Iterable[int] | torch.Tensor) -> MemoryState:
        """Select batch rows (an int keeps a batch dimension of 1); a LongTensor reorders, e.g. for beam search."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1) if rows != -1 else slice(-1, None)
        elif not isinstance(rows, (slice, torch.Tensor)):
            rows = torch.as_tensor(list(rows), dtype=torch.long)
        return self._with_states(
            {k: v[rows.to(v.device) if torch.is_tensor(rows) else rows] for k, v in self.states.items()}
        )

    @classmethod
    def cat(cls, memories: Iterable[MemoryState]) -> MemoryState:
        """Concatenate the rows of several memories of the same adapter layout into one batch."""
        memories = list(memories)
        sized = [m for m in memories if not m.is_empty]
        if not memories or len(sized) != len(memories):
            raise ValueError("MemoryState.cat needs memories that have been used (sized) at least once.")
        layouts = {m.layout for m in sized}
        if len(layouts) != 1:
            raise ValueError(f"MemoryState.cat: the memories belong to different adapters ({len(layouts)} layouts).")
        states = {name: torch.cat([m.states[name] for m in sized]) for name in sized[0].layout.layers}
        return sized[0]._with_states(states)

    def __len__(self) -> int:
        return self.batch_size or 0

    def __repr__(self) -> str:
        if self.layout is None:
            return "MemoryState(empty)"
        return f"MemoryState(batch_size={self.batch_size}, {self.layout.describe()})"

    def norms(self) -> dict[str, torch.Tensor]:
        """Frobenius norm of each layer's state, per batch row and state head ([B, n] per layer)."""
        return {k: torch.linalg.matrix_norm(v.detach()) for k, v in self.states.items()}

    # ----- files ---------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, extra_metadata: Mapping[str, str] | None = None) -> None:
        """Write the memory to a safetensors file (atomically) with a JSON header naming its adapter layout.

        ``extra_metadata``: more string entries for the header (e.g. the vLLM engine records which request wrote the
        file); :meth:`load` ignores them.
        """
        if self.layout is None:
            raise ValueError("Cannot save an empty MemoryState: run the model with memory=... first.")
        header = {
            **{str(k): str(v) for k, v in (extra_metadata or {}).items()},
            "format": _FORMAT,
            "version": str(_VERSION),
            "layout": json.dumps(asdict(self.layout)),
            "adapter_config": json.dumps(self.adapter_config, sort_keys=True, default=str),
        }
        tensors = {name: state.detach().contiguous().cpu() for name, state in self.states.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> MemoryState:
        """Read a memory written by :meth:`save`; a corrupt, truncated or foreign file raises ``ValueError``."""
        try:
            tensors = load_file(str(path), device=str(device))

            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a readable δ-mem memory file ({err}). Save it again with mem.save()."
            ) from err
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path} is a safetensors file but not a δ-mem memory (no '{_FORMAT}' header).")
        try:
            raw = json.loads(header["layout"])
            layout = MemoryLayout(
                r=int(raw["r"]), num_state_heads=int(raw["num_state_heads"]), layers=tuple(raw["layers"])
            )
            adapter_config = json.loads(header.get("adapter_config", "{}"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} has a damaged memory header ({err}).") from err
        if set(tensors) != set(layout.layers):
            raise ValueError(f"{path}: the stored layers do not match its header; the file is damaged.")
        sizes = {t.shape[0] for t in tensors.values()}
        expected_tail = (layout.num_state_heads, layout.r, layout.r)
        if len(sizes) != 1 or any(t.dim() != 4 or tuple(t.shape[1:]) != expected_tail for t in tensors.values()):
            raise ValueError(f"{path}: stored states do not have the shape [B, {', '.join(map(str, expected_tail))}].")
        memory = cls()
        memory.layout, memory.adapter_config = layout, adapter_config
        memory.states = {name: tensors[name].float() for name in layout.layers}
        return memory


def _layer_diff(old: tuple[str, ...], new: tuple[str, ...]) -> str:
    if old == new:
        return ""
    missing, extra = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    parts = []
    if missing:
        parts.append(f"missing layers {missing[:3]}{'…' if len(missing) > 3 else ''}")
    if extra:
        parts.append(f"unknown layers {extra[:3]}{'…' if len(extra) > 3 else ''}")
    return f" ({'; '.join(parts)})" if parts else " (layers in another order)"
