"""The memory recurrence as an operator (DESIGN.md §2): one signature, a recurrent and a chunked implementation."""

from __future__ import annotations

import torch

from .recurrent import recurrent_delta_rule_scan

__all__ = ["SCAN_IMPLS", "delta_rule_scan"]

SCAN_IMPLS = ("auto", "recurrent", "chunked")

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
    (chunked for T > 1, recurrent for T = 1).
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"delta_rule_scan: impl must be one of {SCAN_IMPLS}, got {impl!r}")
    if _autocast_enabled(q.device.type):
        # The recurrence runs in float32 whatever the surrounding autocast says (DESIGN.md §1, "Precision"): under
        # autocast its matmuls would run in half precision and hand back a half-precision memory.
        with torch.autocast(q.device.type, enabled=False):
            return delta_rule_scan(q, k, v, keep, erase, write, state, mask, impl=impl, chunk_size=chunk_size)
    if impl == "auto":
        impl = "chunked" if q.shape[1] > 1 else "recurrent"
    if impl == "chunked":
        from .chunked import chunked_delta_rule_scan

        return chunked_delta_rule_scan(q, k, v, keep, erase, write, state, mask, chunk_size=chunk_size)
    return recurrent_delta_rule_scan(q, k, v, keep, erase, write, state, mask)
