"""The memory recurrence as an operator (docs/design.md §2): one signature, a recurrent and a chunked implementation."""

from __future__ import annotations

import torch

from .fused import (
    disable_fused_decode,
    disable_fused_scan,
    enable_fused_decode,
    enable_fused_scan,
    fused_decode_enabled,
    fused_scan_enabled,
)
from .recurrent import recurrent_delta_rule_scan

__all__ = [
    "SCAN_IMPLS",
    "auto_impl",
    "delta_rule_scan",
    "disable_fused_decode",
    "disable_fused_scan",
    "enable_fused_decode",
    "enable_fused_scan",
    "fused_decode_enabled",
    "fused_scan_enabled",
]

SCAN_IMPLS = ("auto", "recurrent", "chunked")

# impl="auto": the chunked form from this many tokens on. Measured on one CPU thread (docs/benchmarks.md, the short
# sequences table): its fixed cost (a few dozen small ops) equals about 16 tokens of the token loop for the
# forward+backward and about 32 for the forward alone.
AUTO_MIN_TOKENS = 16
AUTO_MIN_TOKENS_NO_GRAD = 32


def auto_impl(n: int, t_len: int, r: int, *, grad: bool) -> str:
    """What ``impl="auto"`` runs for N sequences of T tokens at rank r (``grad``: a backward will follow)."""
    del n, r  # the crossover measured hardly moves with the shape
    threshold = AUTO_MIN_TOKENS if grad else AUTO_MIN_TOKENS_NO_GRAD
    return "chunked" if t_len >= threshold else "recurrent"


try:  # torch >= 2.4 takes the device type
    torch.is_autocast_enabled("cpu")

    def _autocast_enabled(device_type: str) -> bool:
        return torch.is_autocast_enabled(device_type)

except TypeError:  # torch 2.3

    def _autocast_enabled(device_type: str) -> bool:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def delta_rule_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read-before-write row-gated delta rule over a sequence; returns ``(reads, final_state)``.

    ``q, k, v`` are [N, T, r]; the gates ``keep, erase, write`` are [N, T, r] or [N, T, 1] (broadcast over rows);
    ``state`` is [N, r, r] or None (zeros); ``mask`` is [N, T] bool with True for valid tokens, or None.
    ``reads[:, t] = S_{t-1} q_t`` (0 where masked) in q's dtype; ``final_state`` is float32.
    ``impl`` is "recurrent" (token by token, the specification), "chunked" (chunkwise-parallel) or "auto"
    (:func:`auto_impl`: the token loop below 16 tokens, below 32 for a forward without gradients; the chunked form
    otherwise). ``chunk_size`` is the chunked form's chunk length; None picks the
    one measured fastest for the shape (:func:`peft_deltamem.ops.chunked.default_chunk_size`).
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"delta_rule_scan: impl must be one of {SCAN_IMPLS}, got {impl!r}")
    if _autocast_enabled(q.device.type):
        # The recurrence runs in float32 whatever the surrounding autocast says (docs/design.md §1, "Precision"): under
        # autocast its matmuls would run in half precision and hand back a half-precision memory.
        with torch.autocast(q.device.type, enabled=False):
            return delta_rule_scan(q, k, v, keep, erase, write, state, mask, impl=impl, chunk_size=chunk_size)
    if impl == "auto":
        inputs = (q, k, v, keep, erase, write, state)
        grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
        impl = auto_impl(q.shape[0], q.shape[1], q.shape[2], grad=grad)
    if impl == "chunked":
        from .chunked import chunked_delta_rule_scan

        return chunked_delta_rule_scan(q, k, v, keep, erase, write, state, mask, chunk_size=chunk_size)
    return recurrent_delta_rule_scan(q, k, v, keep, erase, write, state, mask)
