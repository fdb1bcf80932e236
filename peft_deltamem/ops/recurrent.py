"""Token-by-token row-gated delta rule: the readable specification of DESIGN.md §1-§2, and the decode path."""

from __future__ import annotations

import torch


def recurrent_delta_rule_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the memory recurrence one token at a time.

    Shapes: ``q, k, v`` [N, T, r]; ``keep, erase, write`` [N, T, r] or [N, T, 1]; ``state`` [N, r, r] (rows = value
    dimension, columns = key dimension) or None for zeros; ``mask`` [N, T] bool (True = valid) or None.

    Per valid token: ``read_t = S q_t`` (before the write), then
    ``S <- diag(keep_t) S - diag(erase_t) (S k_t) k_tᵀ + diag(write_t) v_t k_tᵀ``.
    A masked token reads 0 and leaves ``S`` unchanged. Returns ``(reads [N, T, r] in q's dtype, final state float32)``.
    """
    out_dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    keep, erase, write = keep.float(), erase.float(), write.float()
    n, t, r = q.shape
    s = q.new_zeros(n, r, r) if state is None else state.float()
    reads = []
    for i in range(t):
        q_t, k_t, v_t = q[:, i], k[:, i], v[:, i]
        read = torch.einsum("nvk,nk->nv", s, q_t)
        s_k = torch.einsum("nvk,nk->nv", s, k_t)
        # Each row (value dim) is its own scalar-gated delta rule; all rows share the key k_t.
        update = (write[:, i] * v_t - erase[:, i] * s_k).unsqueeze(-1) * k_t.unsqueeze(-2)
        s_next = keep[:, i].unsqueeze(-1) * s + update
        if mask is not None:
            valid = mask[:, i].view(n, 1)
            read = torch.where(valid, read, torch.zeros_like(read))
            s_next = torch.where(valid.view(n, 1, 1), s_next, s)
        s = s_next
        reads.append(read)
    reads_out = torch.stack(reads, dim=1) if reads else q.new_zeros(n, 0, r)
    return reads_out.to(out_dtype), s
