"""Chunkwise-parallel row-gated delta rule (DESIGN.md §2): the training and prefill path.

The recurrence, per value row ``i`` of the r×r state (rows are independent scalar-gated delta rules that share
q and k), with ``s_t`` the row after token t (a row vector over the key dimension):

    read_t = s_{t-1}·q_t,     s_t = keep_t s_{t-1} + u_t k_t,     u_t = write_t v_t − erase_t (s_{t-1}·k_t).

Split the sequence into chunks of C tokens. Inside a chunk that starts from ``s_0``, with
``Γ_t = Σ_{j<t} log keep_j`` and ``D_tj = exp(Γ_t − Γ_{j+1})`` for j < t (else 0):

    (I + diag(erase) (D ⊙ K Kᵀ)) u = write ⊙ v − erase ⊙ exp(Γ) ⊙ (K s_0ᵀ)      (unit lower-triangular, C×C)
    read_t = exp(Γ_t) (q_t·s_0) + Σ_{j<t} D_tj (q_t·k_j) u_j
    s_C    = exp(Γ_C) s_0 + Σ_j exp(Γ_C − Γ_{j+1}) u_j k_j

Every ``exp(Γ_a − Γ_b)`` is the product ``Π_{b≤m<a} keep_m`` and is computed as a cumulative product (no log:
keep = 0 is exact, gradients included). The system is linear in ``s_0``, so it is solved for all chunks at once
*before* the states are known: ``u = u_free − W s_0`` with ``u_free = A⁻¹ (write ⊙ v)`` and
``W = A⁻¹ diag(erase ⊙ exp Γ) K``. The chunk then maps its
start row to its end row affinely, ``s_C = M s_0 + m``, and only that tiny r×r map per row is applied
sequentially, once per chunk. Everything of size C×C is computed for all chunks and rows in one go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """[N, n_chunks·chunk, f] -> [N, n_chunks, chunk, f]."""
    return x.reshape(x.shape[0], n_chunks, chunk, x.shape[-1])


def _rows_first(g: torch.Tensor) -> torch.Tensor:
    """Gate [N, nc, C, g] -> [N, nc, g, C]: one length-C sequence per state row (g = r, or 1 = shared by rows)."""
    return g.transpose(-1, -2)


def chunked_delta_rule_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form of the memory recurrence; same contract as :func:`peft_deltamem.ops.delta_rule_scan`.

    Shapes: ``q, k, v`` [N, T, r]; ``keep, erase, write`` [N, T, r] or [N, T, 1] (broadcast over rows); ``state``
    [N, r, r] or None (zeros); ``mask`` [N, T] bool (True = valid) or None. Computed in float32; returns
    ``(reads [N, T, r] in q's dtype, final_state [N, r, r] float32)``, differentiable in every input.
    Gates are expected in [0, 1] (sigmoid outputs); keep = 0 is handled exactly (forward and gradients).
    ``chunk_size`` is the number of tokens C solved together (capped at T; T is padded
    to a multiple of C with identity steps). Agrees with the recurrent form to float32 round-off; see the module
    docstring for the math.
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_delta_rule_scan: chunk_size must be >= 1, got {chunk_size}")
    out_dtype = q.dtype
    n, t_len, r = q.shape
    f32 = torch.float32
    s0 = torch.zeros(n, r, r, dtype=f32, device=q.device) if state is None else state.float()
    if t_len == 0:
        return q.new_zeros(n, 0, r), s0

    q, k, v = q.float(), k.float(), v.float()
    keep, erase, write = keep.float(), erase.float(), write.float()
    if mask is not None:
        # A masked token is the identity step: keep 1, erase 0, write 0 (so u_t = 0 and it never touches the state).
        valid = mask.to(torch.bool).unsqueeze(-1)
        keep = torch.where(valid, keep, 1.0)
        erase = torch.where(valid, erase, 0.0)
        write = torch.where(valid, write, 0.0)

    # Pad T up to a multiple of C with identity steps (zero q/k/v, keep 1, erase/write 0); their reads are dropped.
    chunk = min(chunk_size, t_len)
    pad = -t_len % chunk
    if pad:
        q, k, v, erase, write = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, erase, write))
        keep = F.pad(keep, (0, 0, 0, pad), value=1.0)
    n_chunks = (t_len + pad) // chunk
    q, k, v, keep, erase, write = (_to_chunks(x, n_chunks, chunk) for x in (q, k, v, keep, erase, write))
    # Per-row gate sequences [N, nc, g, C]; g = 1 broadcasts over the r rows in everything below.
    keep_rows, erase_rows = _rows_first(keep), _rows_first(erase)

    # --- Decays, per row: products of keep over token ranges, i.e. exp of differences of Γ_t = Σ_{m<t} log keep_m,
    # but formed as cumulative *products* of keep: no log, so keep = 0 (a saturated gate) is exact, gradient
    # included, and no Γ_t − Γ_{j+1} cancellation when Γ is large and negative.
    ones = torch.ones_like(keep_rows[..., :1])
    keep_before = torch.cat([ones, keep_rows[..., :-1]], dim=-1)  # keep_{t-1} (1 at t = 0)
    decay_in = keep_before.cumprod(-1)  # exp(Γ_t) = Π_{m<t} keep_m: how much of s_0 survives to token t
    keep_after = torch.cat([keep_rows[..., 1:], ones], dim=-1)  # keep_{j+1} (1 at j = C-1)
    decay_out = keep_after.flip(-1).cumprod(-1).flip(-1)  # exp(Γ_C − Γ_{j+1}) = Π_{m>j} keep_m: token j's write
    decay_all = keep_rows.prod(-1)  # exp(Γ_C)
    # D_tj = exp(Γ_t − Γ_{j+1}) = Π_{j<m<t} keep_m as a [t, j] matrix: a cumulative product down each column j of
    # keep_{t-1} for t ≥ j+2 (1 above). D_{t,t-1} = 1. Its upper triangle (j ≥ t) is 1, not 0: the solve reads only
    # the strictly lower part, and the read masks it through q·k, which is cheaper than masking this per-row tensor.
    from_j2 = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-2)  # t ≥ j + 2
    decay_intra = torch.where(from_j2, keep_before.unsqueeze(-1), 1.0).cumprod(-2)  # [N, nc, g, C (t), C (j)]

    # --- Products shared by all rows: one C×C Gram matrix per chunk. Reads use only j < t (read before write).
    kk = k @ k.transpose(-1, -2)  # [N, nc, C, C]
    qk = (q @ k.transpose(-1, -2)).tril(-1)

    # --- Intra-chunk solve, per row, for all chunks at once. The system matrix is I + strictly-lower part; the
    # solver is told the diagonal is 1 (unitriangular), so only the strictly lower part L is formed.
    lower = erase_rows.unsqueeze(-1) * decay_intra * kk.unsqueeze(2)  # [N, nc, g, C, C]
    # Right-hand sides: column 0 is write ⊙ v (gives u_free); columns 1..r are erase ⊙ exp(Γ) ⊙ K (gives W).
    wv = (write * v).transpose(-1, -2).unsqueeze(-1)  # [N, nc, r, C, 1]
    ek = (erase_rows * decay_in).unsqueeze(-1) * k.unsqueeze(2)  # [N, nc, g, C, r]
    rhs = torch.cat([wv, ek.expand(n, n_chunks, r, chunk, r)], dim=-1)
    sol = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    u_free, w = sol[..., 0], sol[..., 1:]  # u = u_free − W s_0: [N, nc, r, C] and [N, nc, r, C, r]

    # --- Chunk transition per row: s_C = M s_0 + m with M = exp(Γ_C) I − Kᵀ diag(b) W, m = Kᵀ (b ⊙ u_free),
    # b_j = exp(Γ_C − Γ_{j+1}).
    eye = torch.eye(r, dtype=f32, device=q.device)
    trans = decay_all[..., None, None] * eye - k.transpose(-1, -2).unsqueeze(2) @ (decay_out.unsqueeze(-1) * w)
    offset = ((decay_out * u_free).unsqueeze(-2) @ k.unsqueeze(2)).squeeze(-2)  # [N, nc, r, r]
    trans = trans.expand(n, n_chunks, r, r, r)

    # --- The only sequential part: carry the state across chunks, rows folded into the batch ((N·r) r×r maps).
    trans_seq = trans.transpose(0, 1).reshape(n_chunks, n * r, r, r)
    offset_seq = offset.transpose(0, 1).reshape(n_chunks, n * r, r, 1)
    s = s0.reshape(n * r, r, 1)
    starts = []
    # unbind (not indexing in the loop): its backward stacks the per-chunk gradients once, instead of one
    # full-size zero tensor per chunk.
    for trans_c, offset_c in zip(trans_seq.unbind(0), offset_seq.unbind(0), strict=True):
        starts.append(s)
        s = torch.baddbmm(offset_c, trans_c, s)
    final_state = s.reshape(n, r, r)
    s_start = torch.stack(starts, dim=1).reshape(n, r, n_chunks, r).transpose(1, 2)  # [N, nc, r, r]: s_0 per chunk

    # --- Reads for all chunks at once, now that each chunk's s_0 is known.
    u = u_free - (w @ s_start.unsqueeze(-1)).squeeze(-1)  # [N, nc, r, C]
    read_state = decay_in * (s_start @ q.transpose(-1, -2))  # exp(Γ_t) (q_t·s_0)
    read_intra = ((decay_intra * qk.unsqueeze(2)) @ u.unsqueeze(-1)).squeeze(-1)  # Σ_j D_tj (q_t·k_j) u_j
    reads = (read_state + read_intra).transpose(-1, -2).reshape(n, n_chunks * chunk, r)[:, :t_len]
    if mask is not None:
        reads = torch.where(mask.to(torch.bool).unsqueeze(-1), reads, 0.0)
    return reads.to(out_dtype), final_state
