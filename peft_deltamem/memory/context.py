"""`MemoryCallContext`: what one model call hands every δ-mem layer (the memory, token validity, the switches).

It travels as the keyword argument :data:`CONTEXT_KWARG` (see :mod:`peft_deltamem.memory.hooks`); the layers read their
initial states from it and leave their final states (and write gates) in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .state import MemoryState

CONTEXT_KWARG = "deltamem_context"


@dataclass
class MemoryCallContext:
    """Everything a δ-mem layer needs from the model call: the memory, token validity and the write switch."""

    memory: MemoryState
    token_mask: torch.Tensor  # [B, T] bool, True for tokens that are read and written
    all_valid: bool = False  # every entry of token_mask is True (layers then skip the masking)
    write: bool = True
    read: bool = True  # False: a write-only pass, the layers write but add no corrections
    segment_ids: torch.Tensor | None = None  # [B, T] message/sentence ids (−1 = not written), segment writes only
    initial_states: dict[str, torch.Tensor] = field(default_factory=dict)
    final_states: dict[str, torch.Tensor] = field(default_factory=dict)
    record_write_gates: bool = False
    write_gates: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    reached: set[str] = field(default_factory=set)  # layers that read their initial state during this call

    def initial_state(self, layer: str) -> torch.Tensor:
        """The layer's memory [B, n, r, r] as it was when the call began (and a record that it reached the layer)."""
        self.reached.add(layer)
        return self.initial_states[layer]

    def check_reached(self) -> None:
        """Raise unless every adapted layer read the memory during the call: a memory must never be lost silently."""
        missing = [layer for layer in self.memory.layout.layers if layer not in self.reached]
        if missing:
            raise RuntimeError(
                f"The δ-mem memory of this call never reached {len(missing)} of {len(self.memory.layout.layers)} "
                f"adapted layers (first: {missing[0]!r}), so their reads and writes were lost. The model did not "
                "pass the memory context from its forward call down to its attention modules: a transformers release "
                "may have changed how keyword arguments travel. Pin a supported transformers version (see "
                "requirements.lock) and report the versions of transformers and peft_deltamem."
            )

    def record(self, layer: str, final_state: torch.Tensor, write_gate: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep the layer's state after this call's writes (and its write gates, when asked for)."""
        self.final_states[layer] = final_state
        if self.record_write_gates:
            self.write_gates[layer] = (write_gate, mask)
