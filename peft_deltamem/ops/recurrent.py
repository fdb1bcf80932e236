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
    # This loop is also the decode path (one step per generated token), so each step is kept to few operations:
    # the inputs are split into per-token views once (unbind), and q_t, k_t are the two columns of one r×2 matrix,
    # so a single product S [q_t k_t] gives both S q_t and S k_t.
    qk = torch.stack((q, k), dim=-1)  # [N, T, r, 2]
    valid_steps = mask.unsqueeze(-1).unbind(1) if mask is not None else (None,) * t  # [N, 1] each
    per_token = (qk, k, v, keep, erase, write)
    steps = zip(*(x.unbind(1) for x in per_token), valid_steps, strict=True)
    reads = []
    for qk_t, k_t, v_t, keep_t, erase_t, write_t, valid in steps:
        read, s_k = torch.bmm(s, qk_t).unbind(-1)  # read = S q_t, s_k = S k_t
        # Each row (value dim) is its own scalar-gated delta rule; all rows share the key k_t.
        update = (write_t * v_t - erase_t * s_k).unsqueeze(-1) * k_t.unsqueeze(-2)
        s_next = keep_t.unsqueeze(-1) * s + update
        if valid is not None:
            read = torch.where(valid, read, 0.0)
            s_next = torch.where(valid.unsqueeze(-1), s_next, s)
        s = s_next
        reads.append(read)
    reads_out = torch.stack(reads, dim=1) if reads else q.new_zeros(n, 0, r)
    return reads_out.to(out_dtype), s
