"""Chunkwise-parallel row-gated delta rule (DESIGN.md §2): the training and prefill path.

The recurrence, per value row ``i`` of the r×r state (rows are independent scalar-gated delta rules that share
q and k), with ``s_t`` the row after token t (a row vector over the key dimension):

    read_t = s_{t-1}·q_t,     s_t = keep_t s_{t-1} + u_t k_t,     u_t = write_t v_t − erase_t (s_{t-1}·k_t).

Split the sequence into chunks of C tokens. Inside a chunk that starts from ``s_0``, with
``Γ_t = Σ_{j<t} log keep_j`` and ``D_tj = exp(Γ_t − Γ_{j+1})`` for j < t (else 0):

    (I + diag(erase) (D ⊙ K Kᵀ)) u = write ⊙ v − erase ⊙ exp(Γ) ⊙ (K s_0ᵀ)      (unit lower-triangular, C×C)
    read_t = exp(Γ_t) (q_t·s_0) + Σ_{j<t} D_tj (q_t·k_j) u_j
    s_C    = exp(Γ_C) s_0 + Σ_j exp(Γ_C − Γ_{j+1}) u_j k_j

The system is linear in ``s_0``, so it is solved for all chunks at once *before* the states are known:
``u = U0 − W s_0`` with ``U0 = A⁻¹ (write ⊙ v)`` and ``W = A⁻¹ diag(erase ⊙ exp Γ) K``. The chunk then maps its
start row to its end row affinely, ``s_C = M s_0 + m``, and only that tiny r×r map per row is applied
sequentially, once per chunk. Everything of size C×C is computed for all chunks and rows in one go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# log(keep) needs keep > 0. A keep of exactly 0 (a saturated sigmoid, or 1 − β with β rounded to 1) is clamped to
# the smallest normal float32: its decay becomes 1.2e-38 instead of 0 (invisible in float32 sums), and the gradient
# with respect to that keep is 0 instead of S_{t-1}·∂L/∂S_t. That only happens where the gate's own sigmoid is
# saturated, whose float32 derivative is already 0, so gradients of the gate parameters are unaffected.
_KEEP_FLOOR = torch.finfo(torch.float32).tiny


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
    Gates are expected in [0, 1] (sigmoid outputs); ``keep`` is floored at the smallest normal float32 before its
    log (see ``_KEEP_FLOOR``). ``chunk_size`` is the number of tokens C solved together (capped at T; T is padded
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

    # --- Decays. seg[c, t] = Σ_{c ≤ m < t} log keep_m for 0 ≤ c ≤ t ≤ C, built as a cumulative sum along t (not as a
    # difference Γ_t − Γ_c, which would lose precision when Γ is large and negative); 0 for c > t.
    # Then exp(Γ_t) = E[0, t], D_tj = E[j+1, t], exp(Γ_C − Γ_{j+1}) = E[j+1, C], exp(Γ_C) = E[0, C].
    log_keep = torch.log(keep_rows.clamp_min(_KEEP_FLOOR))
    shifted = F.pad(log_keep, (1, 0))  # shifted[t] = log keep_{t-1}, t = 0..C
    after = torch.ones(chunk + 1, chunk + 1, dtype=torch.bool, device=q.device).triu(1)  # t > c
    decay = (shifted.unsqueeze(-2) * after).cumsum(-1).exp()  # [N, nc, g, C+1 (c), C+1 (t)]
    decay_in = decay[..., 0, :chunk]  # exp(Γ_t): how much of s_0 survives to token t
    # D_tj as [t, j]. Its upper triangle (j ≥ t) holds exp(0) = 1, not 0: the solve reads only the strictly lower
    # part, and the read masks it through q·k, which is cheaper than masking this per-row tensor.
    decay_intra = decay[..., 1:, :chunk].transpose(-1, -2)
    decay_out = decay[..., 1:, chunk]  # exp(Γ_C − Γ_{j+1}): how much of token j's write survives the chunk
    decay_all = decay[..., 0, chunk]  # exp(Γ_C)

    # --- Products shared by all rows: one C×C Gram matrix per chunk. Reads use only j < t (read before write).
    kk = k @ k.transpose(-1, -2)  # [N, nc, C, C]
    qk = (q @ k.transpose(-1, -2)).tril(-1)

    # --- Intra-chunk solve, per row, for all chunks at once. The system matrix is I + strictly-lower part; the
    # solver is told the diagonal is 1 (unitriangular), so only the strictly lower part L is formed.
    lower = erase_rows.unsqueeze(-1) * decay_intra * kk.unsqueeze(2)  # [N, nc, g, C, C]
    # Right-hand sides: column 0 is write ⊙ v (gives U0); columns 1..r are erase ⊙ exp(Γ) ⊙ K (gives W).
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
