"""Token-by-token row-gated delta rule: the readable specification of docs/design.md §1-§2, and the decode path."""

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
    q, k, v = _float(q), _float(k), _float(v)
    keep, erase, write = _float(keep), _float(erase), _float(write)
    n, t, r = q.shape
    s = q.new_zeros(n, r, r) if state is None else _float(state)
    if t == 0:
        return q.new_zeros(n, 0, r).to(out_dtype), s
    if t == 1:
        # The decode path (one step per generated token): no per-token views.
        read, s = _step(s, q, k, v, keep, erase, write, None if mask is None else mask.reshape(n, 1, 1))
        return (read if read.dtype == out_dtype else read.to(out_dtype)), s
    steps = zip(
        *(x.split(1, dim=1) for x in (q, k, v, keep, erase, write)),
        mask.reshape(n, t, 1).split(1, dim=1) if mask is not None else (None,) * t,
        strict=True,
    )
    reads = []
    for q_t, k_t, v_t, keep_t, erase_t, write_t, valid in steps:
        read, s = _step(s, q_t, k_t, v_t, keep_t, erase_t, write_t, valid)
        reads.append(read)
    return torch.cat(reads, dim=1).to(out_dtype), s


def _step(
    s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    keep_t: torch.Tensor,
    erase_t: torch.Tensor,
    write_t: torch.Tensor,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``(read [N, 1, r], next state [N, r, r])`` from the state and the token's [N, 1, ·] inputs.

    Vectors are rows here ([N, 1, r]); S's rows are value dimensions, so ``x Sᵀ`` is ``(S x)ᵀ``. ``q_t`` and ``k_t``
    go through one product: ``[q_t; k_t] Sᵀ`` gives both ``S q_t`` and ``S k_t``.
    """
    read, s_k = torch.bmm(torch.cat((q_t, k_t), dim=1), s.transpose(1, 2)).split(1, dim=1)
    # Each row (value dim) is its own scalar-gated delta rule; all rows share the key k_t.
    update = (write_t * v_t - erase_t * s_k).transpose(1, 2) * k_t  # u_t k_tᵀ, [N, r, r]
    s_next = keep_t.transpose(1, 2) * s + update  # diag(keep_t) S + …
    if valid is None:
        return read, s_next
    # A masked token reads 0 and leaves S unchanged.
    return torch.where(valid, read, 0.0), torch.where(valid, s_next, s)


def _float(x: torch.Tensor) -> torch.Tensor:
    # .float() is an operator call even on a float32 tensor; decode runs this for every input of every layer.
    return x if x.dtype == torch.float32 else x.float()
