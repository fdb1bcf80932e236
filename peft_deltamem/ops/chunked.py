"""Chunkwise-parallel row-gated delta rule (docs/design.md §2): the training and prefill path.

The recurrence, per value row ``i`` of the r×r state (rows are independent scalar-gated delta rules that share
q and k), with ``s_t`` the row after token t (a row vector over the key dimension):

    read_t = s_{t-1}·q_t,     s_t = keep_t s_{t-1} + u_t k_t,     u_t = write_t v_t − erase_t (s_{t-1}·k_t).

Split the sequence into chunks of C tokens. Inside a chunk that starts from ``s_0``, with
``Γ_t = Σ_{j<t} log keep_j`` and ``D_tj = exp(Γ_t − Γ_{j+1})`` for j < t (else 0):

    (I + diag(erase) (D ⊙ K Kᵀ)) u = write ⊙ v − erase ⊙ exp(Γ) ⊙ (K s_0ᵀ)      (unit lower-triangular, C×C)
    read_t = exp(Γ_t) (q_t·s_0) + Σ_{j<t} D_tj (q_t·k_j) u_j
    s_C    = exp(Γ_C) s_0 + Σ_j exp(Γ_C − Γ_{j+1}) u_j k_j

The sequence is processed in segments of whole chunks (a segment's intermediates take at most
:data:`SEGMENT_FLOATS` floats each), each in one of two forms:

- the **factored form** (:func:`_factored_forward`, :func:`_factored_backward`), used whenever the keep gates are not
  saturated: ``D_tj = P_t / P'_j`` with the running products of keep, so that everything except the per-row C×C
  solve is a matmul with matrices all rows share; its backward is written out by hand;
- the **plain form** (:func:`_plain_segment`), for segments with keeps near or at 0: the per-row decays as
  cumulative *products* of keep (no log, no division: keep = 0 is exact, gradients included), differentiated by
  autograd.

In both, the state is carried chunk by chunk (the only sequential part) and everything else is done for all chunks
of a segment at once. The backward (:class:`_ChunkedScan`) keeps from the forward only each chunk's start state and
u (factored) or each segment's start state (plain), and recomputes the rest segment by segment in reverse, so memory
grows linearly in T with a small constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .fused import fused_scan_enabled, row_solve

__all__ = ["chunked_delta_rule_scan", "default_chunk_size", "segment_tokens"]

# Floats that one segment's largest intermediate may hold in the backward (256 KB; a few dozen such tensors are alive
# at once): this bounds the memory of the backward whatever T is. The forward, with far fewer intermediates and no
# autograd, runs segments FORWARD_SEGMENTS times as long (the factored backward splits them at chunk boundaries).
SEGMENT_FLOATS = 2**16
FORWARD_SEGMENTS = 4


def default_chunk_size(n: int, t_len: int, r: int, rowwise: bool = True) -> int:
    """The chunk size C measured fastest for a shape (docs/benchmarks.md, one CPU thread): 64 up to 8 independent
    rows, else 32. Per token the chunked form costs about C multiply-adds per state row (the per-row C×C system and
    its solve) plus a fixed cost per chunk (a few dozen small ops), so few rows favour long chunks. Rows are N·r with
    rank-wise gates, N with keep and erase shared by the rows (one solve for all rows)."""
    rows = n * r if rowwise else n
    c = 64 if rows <= 8 else 32
    return max(1, min(c, t_len))


def segment_tokens(n: int, r: int, g: int, chunk: int, per_row: bool = False, scale: int = 1) -> int:
    """Tokens per segment: a whole number of chunks whose largest intermediate fits ``scale`` × :data:`SEGMENT_FLOATS`.
    That is [N, tokens, max(r, C)] for the factored form, and [N, g, tokens, C] (the per-row decays) with
    ``per_row``, for the plain form."""
    per_chunk = n * chunk * (max(g, 1) * chunk if per_row else max(r, chunk))
    return chunk * max(1, scale * SEGMENT_FLOATS // per_chunk)


def _segments(t_len: int, chunk: int, seg: int) -> list[tuple[int, int, int]]:
    """Split [0, T) into (start, length, chunk) pieces, each a whole number of chunks: full segments of ``seg``
    tokens, the remaining whole chunks, then one last shorter chunk if C does not divide T (no padding)."""
    pieces, start = [], 0
    while t_len - start >= seg:
        pieces.append((start, seg, chunk))
        start += seg
    whole = (t_len - start) // chunk * chunk
    if whole:
        pieces.append((start, whole, chunk))
        start += whole
    if t_len - start:
        pieces.append((start, t_len - start, t_len - start))
    return pieces


def _plain_segment(inputs: Sequence[torch.Tensor], s: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain form over a segment of whole chunks (float32, plain differentiable torch ops): per-row decays as
    cumulative products, per-row systems solved chunk by chunk.

    ``inputs`` are ``q, k, v`` [N, L, r] and the gates ``keep, erase, write`` [N, L, 1 or r]; ``s`` [N, r, r]; L a
    multiple of ``chunk``. Returns ``(reads [N, L, r], state after the segment)``.
    """
    n, length, r = inputs[0].shape
    nc = length // chunk

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [N, L, f] -> [N, nc, C, f]
        return x.reshape(n, nc, chunk, x.shape[-1])

    q, k, v, keep, erase, write = (chunks(x) for x in inputs)
    # Per-row gate sequences [N, nc, g, C]; g = 1 broadcasts over the r rows in everything below.
    keep_rows, erase_rows = keep.transpose(-1, -2), erase.transpose(-1, -2)
    shared_decay = keep_rows.shape[2] == 1  # D is the same for all rows
    shared_solve = shared_decay and erase_rows.shape[2] == 1  # so is the system matrix

    # --- Decays, per row: products of keep over token ranges (exp of differences of Γ), as cumulative *products*:
    # no log, so keep = 0 (a saturated gate) is exact, gradient included.
    ones = torch.ones_like(keep_rows[..., :1])
    keep_before = torch.cat([ones, keep_rows[..., :-1]], dim=-1)  # keep_{t-1} (1 at t = 0)
    decay_in = keep_before.cumprod(-1)  # exp(Γ_t) = Π_{m<t} keep_m: how much of s_0 survives to token t
    keep_after = torch.cat([keep_rows[..., 1:], ones], dim=-1)  # keep_{j+1} (1 at j = C-1)
    decay_out = keep_after.flip(-1).cumprod(-1).flip(-1)  # exp(Γ_C − Γ_{j+1}) = Π_{m>j} keep_m: token j's write
    decay_all = (decay_in[..., -1] * keep_rows[..., -1]).unsqueeze(-1)  # exp(Γ_C), [N, nc, g, 1]
    # D_tj = exp(Γ_t − Γ_{j+1}) = Π_{j<m<t} keep_m as a [t, j] matrix: a cumulative product down each column j of
    # keep_{t-1} for t ≥ j+2 (1 above). Its upper triangle (j ≥ t) is 1, not 0: the solve reads only the strictly
    # lower part, and the read masks it through q·k.
    from_j2 = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-2)  # t ≥ j + 2
    decay_intra = torch.where(from_j2, keep_before.unsqueeze(-1), 1.0).cumprod(-2)  # [N, nc, g, C (t), C (j)]

    # --- Shared by all rows: one C×C Gram matrix per chunk. Reads use only j < t (read before write).
    kk = k @ k.transpose(-1, -2)  # [N, nc, C, C]
    qk = (q @ k.transpose(-1, -2)).tril(-1)
    # System matrices L = diag(erase)(D ⊙ K Kᵀ) (strictly lower part used) and read weights D ⊙ Q Kᵀ.
    lower = erase_rows.unsqueeze(-1) * decay_intra * kk.unsqueeze(2)  # [N, nc, g, C, C]
    read_w = decay_intra * qk.unsqueeze(2)  # [N, nc, g, C, C]
    wv = (write * v).transpose(-1, -2)  # write ⊙ v, [N, nc, r, C]
    erase_in = erase_rows * decay_in  # erase ⊙ exp(Γ), [N, nc, g, C]
    decay_out_rows = decay_out.expand(n, nc, r, chunk)
    k_t = k.transpose(-1, -2)  # [N, nc, r, C]

    # --- Chunk by chunk: the state at each chunk start, and u (one value per row and token). unbind (not indexing in
    # the loop): its backward stacks the per-chunk gradients once, instead of one full-size zero tensor per chunk.
    starts, us = [], []
    per_chunk = (wv, erase_in, k_t, k, lower[:, :, 0] if shared_solve else lower, decay_all, decay_out_rows)
    for wv_c, erase_in_c, k_t_c, k_c, lower_c, decay_all_c, decay_out_c in zip(
        *(x.unbind(1) for x in per_chunk), strict=True
    ):
        starts.append(s)
        rhs = wv_c - erase_in_c * (s @ k_t_c)  # write ⊙ v − erase ⊙ exp(Γ) ⊙ (K s_0ᵀ), [N, r, C]
        if shared_solve:  # one C×C system, the r rows are its right-hand sides
            u = torch.linalg.solve_triangular(lower_c, rhs.transpose(-1, -2), upper=False, unitriangular=True)
            u = u.transpose(-1, -2)
        else:  # one system per row, one right-hand side each
            u = torch.linalg.solve_triangular(lower_c, rhs.unsqueeze(-1), upper=False, unitriangular=True)
            u = u.squeeze(-1)
        us.append(u)
        s = decay_all_c * s + (decay_out_c * u) @ k_c  # s_C = exp(Γ_C) s_0 + Σ_j b_j u_j k_j
    s_start = torch.stack(starts, dim=1)  # [N, nc, r, r]
    u_all = torch.stack(us, dim=1)  # [N, nc, r, C]

    # --- Reads for all chunks at once: exp(Γ_t) (q_t·s_0) + Σ_{j<t} D_tj (q_t·k_j) u_j.
    reads = decay_in * (s_start @ q.transpose(-1, -2))
    if shared_decay:
        reads = reads + u_all @ read_w[:, :, 0].transpose(-1, -2)
    else:
        reads = reads + (read_w @ u_all.unsqueeze(-1)).squeeze(-1)
    return reads.transpose(-1, -2).reshape(n, length, r), s


# ----------------------------------------------------------------------------------------------------------------------
# The factored form: every per-row C×C product that is not the solve becomes a matmul with a matrix shared by all rows.
#
# Within a chunk write P_t = exp(Γ_t) = Π_{m<t} keep_m and P'_j = exp(Γ_{j+1}) = Π_{m≤j} keep_m. Then
# D_tj = P_t / P'_j, and with the strictly lower shared matrices T = tril₋₁(K Kᵀ), R = tril₋₁(Q Kᵀ) and, per row,
# x = u / P' (elementwise), the system of docs/design.md §2 multiplied out by diag(P') becomes
#
#     (diag(P') + diag(erase ⊙ P) T) x = write ⊙ v − erase ⊙ P ⊙ (K s_0ᵀ)      (lower triangular, C×C, per row)
#     read  = P ⊙ (Q s_0ᵀ + R x)
#     s_C   = P_C (s_0 + Σ_j x_j k_j)
#
# Only the system matrix is formed per row; the reads and the state are matmuls with T, R, K and Q that all rows
# share. The backward is written out by hand in the same terms (gradients of the decays are taken w.r.t. log keep and
# divided by keep at the end), so it needs no other per-row C×C product either, and keeps from the forward only each
# chunk's start state and x. Dividing by keep, and P' on the diagonal, are exact while the products stay far from
# float32's underflow: a segment whose keeps are all ≥ FACTORED_MIN_KEEP and whose chunk products are all
# ≥ FACTORED_MIN_DECAY takes this form, any other the plain form (_plain_segment, differentiated by autograd):
# saturated or near-zero keep gates stay exact.

FACTORED_MIN_KEEP = 1e-2
FACTORED_MIN_DECAY = 1e-20


class _Chunked(NamedTuple):
    """One segment cut into chunks, token-major like the inputs: q, k, v [N, nc, C, r], gates [N, nc, C, g] (g = 1 or
    r). Every tensor of the factored form keeps this layout (a token per row, a state row per column), so nothing is
    transposed into another one: the matmuls read transposed operands in place."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor
    erase: torch.Tensor
    write: torch.Tensor


def _cut(inputs: Sequence[torch.Tensor], chunk: int) -> _Chunked:
    n, length, _ = inputs[0].shape
    q, k, v, keep, erase, write = (x.reshape(n, length // chunk, chunk, x.shape[-1]) for x in inputs)
    # q and k contiguous: a segment is a slice of the sequence, so its batch dims (N, nc) do not merge into one, and
    # every batched matmul reading them (several each) would copy them again. The others only meet elementwise ops.
    return _Chunked(q.contiguous(), k.contiguous(), v, keep, erase, write)


class _Factors(NamedTuple):
    """What a segment's chunks need besides their inputs, token-major."""

    p_in: torch.Tensor  # P_t = Π_{m<t} keep_m, [N, nc, C, gk]
    p_out: torch.Tensor  # P'_j = Π_{m≤j} keep_m
    p_all: torch.Tensor  # P_C, [N, nc, gk, 1]: a factor per state row
    ep: torch.Tensor  # erase ⊙ P, [N, nc, C, g]
    kk: torch.Tensor  # K Kᵀ, [N, nc, C, C]
    tk: torch.Tensor  # T = tril₋₁(K Kᵀ)
    rq: torch.Tensor  # R = tril₋₁(Q Kᵀ)


def _factors(x: _Chunked) -> _Factors:
    p_out = x.keep.cumprod(-2)
    p_in = torch.cat([torch.ones_like(p_out[..., :1, :]), p_out[..., :-1, :]], dim=-2)
    kk = x.k @ x.k.mT
    rq = (x.q @ x.k.mT).tril_(-1)
    return _Factors(p_in, p_out, p_out[..., -1:, :].mT, x.erase * p_in, kk, kk.tril(-1), rq)


def _factored_ok(x: _Chunked, f: _Factors) -> bool:
    return bool(x.keep.min() >= FACTORED_MIN_KEEP) and bool(f.p_all.min() >= FACTORED_MIN_DECAY)


class _Solver(NamedTuple):
    """How a segment's chunks solve for x = u / P', and the operands each chunk's solve reads, [N, nc, ...] (one chunk
    is ``[:, i]``), each in the layout its solver wants, made once per segment rather than once per chunk:

    - ``"fused"`` (one system per state row, the fused scan on, CPU): the C++ substitution reads K Kᵀ and the
      token-major P' and erase ⊙ P (:func:`peft_deltamem.ops.fused.row_solve`), no system is formed;
    - ``"shared"`` (keep and erase shared by the rows): one C×C system per chunk, the rows are its right-hand sides;
    - ``"rows"``: one C×C system per state row, formed and handed to the batched triangular solver, which wants erase ⊙ P
      and P' rows-first ([N, nc, r, C]).
    """

    kind: str
    operands: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _solver(f: _Factors, shared: bool) -> _Solver:
    if shared:
        return _Solver("shared", (f.tk, f.ep, f.p_out))
    if fused_scan_enabled() and f.kk.device.type == "cpu":
        return _Solver("fused", (f.kk, f.p_out, f.ep))  # row_solve's order: gram, P', erase ⊙ P
    return _Solver("rows", (f.tk, f.ep.mT.contiguous(), f.p_out.mT.contiguous()))


def _solve_chunk(
    kind: str, operands: Sequence[torch.Tensor], rhs: torch.Tensor, transpose: bool = False
) -> torch.Tensor:
    """One chunk's x = u / P' from its right-hand side (token-major [N, C, r], a column per state row) with the system
    of the module's factored form, diag(P') + diag(erase ⊙ P) T, lower triangular; or, with ``transpose``, the
    backward's solve with its transpose. ``kind`` and ``operands`` (this chunk's) as in :class:`_Solver`."""
    if kind == "fused":
        x = row_solve(*operands, rhs, transpose)
        if x is None:  # only float32 CPU tensors reach here (_solver): a wrong build or a new caller, say so
            raise RuntimeError("chunked scan: the fused scan solve declined float32 CPU inputs")
        return x
    tk, ep, p_out = operands
    if kind == "shared":
        system = tk * ep  # row t of T times erase_t P_t
        system.diagonal(dim1=-2, dim2=-1).copy_(p_out[..., 0])
        return torch.linalg.solve_triangular(system.mT if transpose else system, rhs, upper=transpose)
    system = tk.unsqueeze(1) * ep.unsqueeze(-1)  # [N, r, C, C], contiguous as the solver reads it
    system.diagonal(dim1=-2, dim2=-1).copy_(p_out)
    a = system.mT if transpose else system
    return torch.linalg.solve_triangular(a, rhs.mT.unsqueeze(-1), upper=transpose).squeeze(-1).mT


def _factored_forward(
    x: _Chunked, f: _Factors, s: torch.Tensor, shared: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (reads [N, nc, C, r], final state, start state per chunk [N, nc, r, r], x = u / P' per chunk
    [N, nc, C, r])."""
    wv = x.write * x.v
    starts, xs = [], []
    solver = _solver(f, shared)
    per_chunk = (wv, x.k, f.p_all, f.ep, *solver.operands)
    for wv_c, k_c, p_all_c, ep_c, *operands_c in zip(*(t.unbind(1) for t in per_chunk), strict=True):
        starts.append(s)
        rhs = torch.addcmul(wv_c, ep_c, torch.bmm(k_c, s.mT), value=-1.0)  # write⊙v − erase⊙P⊙(K s_0ᵀ)
        x_c = _solve_chunk(solver.kind, operands_c, rhs)  # x = u / P'
        xs.append(x_c)
        s = p_all_c * torch.baddbmm(s, x_c.mT, k_c)  # P_C (s_0 + Σ_j x_j k_j)
    s_start, x_all = torch.stack(starts, dim=1), torch.stack(xs, dim=1)
    reads = f.rq @ x_all  # R x
    reads += x.q @ s_start.mT  # Q s_0ᵀ
    return reads.mul_(f.p_in), s, s_start, x_all


def _rows_to(grad: torch.Tensor, width: int) -> torch.Tensor:
    """Sum a per-row gradient [N, nc, C, r] over the rows where its gate is shared ([N, nc, C, 1])."""
    return grad.sum(-1, keepdim=True) if width == 1 else grad


def _factored_backward(
    x: _Chunked,
    f: _Factors,
    s_start: torch.Tensor,
    x_all: torch.Tensor,
    reads: torch.Tensor,
    d_reads: torch.Tensor,
    d_state: torch.Tensor,
    shared: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients of a segment w.r.t. its chunked inputs (as :class:`_Chunked`) and its start state, from what its
    forward kept (each chunk's start state and x = u / P', and the reads it returned), given ``d_reads`` (contiguous
    [N, nc, C, r]) and ``d_state`` (the gradient of the state after the segment)."""
    g_read = d_reads * f.p_in
    dx_read = f.rq.mT @ g_read  # read = P ⊙ (Q s_0ᵀ + R x): through x
    ds_read = g_read.mT @ x.q  # ... through s_0
    dws, dxs, drhss = [], [], []
    ds = d_state
    solver = _solver(f, shared)
    per_chunk = (dx_read, ds_read, x.k, f.p_all, f.ep, *solver.operands)
    chunks = zip(*(t.unbind(1) for t in per_chunk), strict=True)
    for dx_read_c, ds_read_c, k_c, p_all_c, ep_c, *operands_c in reversed(list(chunks)):
        dw = p_all_c * ds  # s_C = P_C w with w = s_0 + Σ_j x_j k_j
        dx = torch.baddbmm(dx_read_c, k_c, dw.mT)
        drhs = _solve_chunk(solver.kind, operands_c, dx, transpose=True)
        ds = torch.baddbmm(ds_read_c + dw, (drhs * ep_c).mT, k_c, alpha=-1.0)  # rhs has −erase⊙P⊙(K s_0ᵀ)
        dws.append(dw), dxs.append(dx), drhss.append(drhs)
    dw, dx, drhs = (torch.stack(t[::-1], dim=1) for t in (dws, dxs, drhss))

    y = drhs * f.ep  # the system's diag(erase⊙P) T and the rhs's erase⊙P⊙(K s_0ᵀ) see −drhs ⊙ erase⊙P
    d_rq = (g_read @ x_all.mT).tril_(-1)
    d_tk = (y @ x_all.mT).tril_(-1).neg_()
    d_tk = d_tk + d_tk.mT  # T = K Kᵀ is symmetric in K
    dq = g_read @ s_start
    dq += d_rq @ x.k
    dk = d_rq.mT @ x.q
    dk += x_all @ dw
    dk += d_tk @ x.k
    dk -= y @ s_start
    # −(gradient w.r.t. erase ⊙ P): through the system (T x) and the rhs (K s_0ᵀ)
    neg_d_ep = (f.tk @ x_all).add_(x.k @ s_start.mT).mul_(drhs)
    # Decays, as gradients w.r.t. log keep: P_t holds keep_m for m < t, P'_j (the system's diagonal) for m ≤ j, P_C
    # all of them. Through the reads: d_reads ⊙ reads; through s_C = P_C w: Σ dw ⊙ w with
    # Σ_j dw (x K)_j = Σ_t x ⊙ (dw Kᵀ) = Σ_t x ⊙ (dx − dx_read).
    gk = x.keep.shape[-1]
    dlog_p_in = _rows_to(d_reads * reads, gk) - _rows_to(neg_d_ep * f.ep, gk)
    dlog_p_out = _rows_to(drhs * x_all * f.p_out, gk).neg_()
    dw_w = (dw * s_start).sum(-1) + (x_all * (dx - dx_read)).sum(-2)  # [N, nc, r]: one per state row
    dlog_p_all = _rows_to(dw_w.unsqueeze(-2), gk)
    # Σ_{t>m} dlog P_t + Σ_{j≥m} dlog P'_j = dlog P'_m + Σ_{t>m} (dlog P_t + dlog P'_t): the two largely cancel, so
    # they are added token by token before the suffix sum (a product with a 0/1 triangle); 4× smaller round-off.
    c = x.keep.shape[-2]
    after = torch.ones(c, c, dtype=dw.dtype, device=dw.device).triu_(1)  # [m, t]: 1 for t > m
    d_keep = after @ (dlog_p_in + dlog_p_out)
    d_keep += dlog_p_out
    d_keep.add_(dlog_p_all).div_(x.keep)
    d_erase = _rows_to(neg_d_ep.mul_(f.p_in).neg_(), x.erase.shape[-1])
    d_v = drhs * x.write
    d_write = _rows_to(drhs * x.v, x.write.shape[-1])
    return [dq, dk, d_v, d_keep, d_erase, d_write], ds


# ----------------------------------------------------------------------------------------------------------------------
# Segments, forward and backward


def _run_segments(
    inputs: tuple[torch.Tensor, ...], s: torch.Tensor, chunk: int, save: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[Any, ...]]]:
    """Scan the whole sequence from ``s``, segment by segment; returns (reads, final state, the pieces that were run:
    ``(form, start, length, chunk, *what its backward needs)``, the chunk start states and u for the factored form,
    the start state for the plain form; only the form and the span unless ``save``)."""
    q, keep, erase = inputs[0], inputs[3], inputs[4]
    n, t_len, r = q.shape
    g = max(keep.shape[-1], erase.shape[-1])
    shared = g == 1
    reads, pieces = [], []

    def run_plain(start: int, length: int, c: int, s: torch.Tensor) -> torch.Tensor:
        piece = [t[:, start : start + length] for t in inputs]
        piece_reads, s_next = _plain_segment(piece, s, c)
        pieces.append(("plain", start, length, c, s) if save else ("plain", start, length, c))
        reads.append(piece_reads)
        return s_next

    for start, length, c in _segments(t_len, chunk, segment_tokens(n, r, g, chunk, scale=FORWARD_SEGMENTS)):
        x = _cut([t[:, start : start + length] for t in inputs], c)
        f = _factors(x)
        if _factored_ok(x, f):
            piece_reads, s, s_start, x_all = _factored_forward(x, f, s, shared)
            pieces.append(("factored", start, length, c, s_start, x_all) if save else ("factored", start, length, c))
            reads.append(piece_reads.flatten(1, 2))
        else:  # the plain form, in its own (smaller) segments
            for sub_start, sub_length, sub_c in _segments(length, c, segment_tokens(n, r, g, c, per_row=True)):
                s = run_plain(start + sub_start, sub_length, sub_c, s)
    return torch.cat(reads, dim=1), s, pieces


class _ChunkedScan(torch.autograd.Function):
    """Forward: the segments in order, keeping per segment only what its backward needs (chunk start states and u,
    or the segment's start state). Backward: the segments in reverse, each recomputed from what was kept (the
    factored form by hand, the plain form under autograd), so at most one segment's intermediates are alive:
    memory linear in T, with a small constant."""

    @staticmethod
    def forward(ctx, q, k, v, keep, erase, write, s0, chunk):  # type: ignore[override]
        reads, final, pieces = _run_segments((q, k, v, keep, erase, write), s0, chunk, save=True)
        ctx.pieces = [piece[:4] for piece in pieces]
        ctx.save_for_backward(q, k, v, keep, erase, write, reads, *(t for piece in pieces for t in piece[4:]))
        return reads, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_reads, d_state):  # type: ignore[override]
        q, k, v, keep, erase, write, reads, *tensors = ctx.saved_tensors
        inputs = (q, k, v, keep, erase, write)
        n, _, r = q.shape
        shared = max(keep.shape[-1], erase.shape[-1]) == 1
        grads = [torch.empty_like(t) for t in inputs]  # every span is written below
        kept, it = [], iter(tensors)
        for form, *_ in ctx.pieces:
            kept.append((next(it), next(it)) if form == "factored" else (next(it),))
        for (form, start, length, chunk), saved in zip(reversed(ctx.pieces), reversed(kept), strict=True):
            if form == "factored":  # in sub-segments of whole chunks, the last first
                step = segment_tokens(n, r, max(keep.shape[-1], erase.shape[-1]), chunk) // chunk
                n_chunks = length // chunk
                for first in reversed(range(0, n_chunks, step)):
                    chunks = slice(first, min(first + step, n_chunks))
                    span = slice(start + chunks.start * chunk, start + chunks.stop * chunk)
                    x = _cut([t[:, span] for t in inputs], chunk)
                    d_span, reads_span = (t[:, span].reshape(n, -1, chunk, r).contiguous() for t in (d_reads, reads))
                    kept_span = [t[:, chunks].contiguous() for t in saved]  # read by several matmuls: see _cut
                    span_grads, d_state = _factored_backward(
                        x, _factors(x), *kept_span, reads_span, d_span, d_state, shared
                    )
                    for grad, span_grad in zip(grads, span_grads, strict=True):
                        grad[:, span] = span_grad.flatten(1, 2)
            else:
                span = slice(start, start + length)
                leaves = [t[:, span].detach().requires_grad_() for t in inputs]
                s_leaf = saved[0].detach().requires_grad_()
                with torch.enable_grad():
                    piece_reads, s_end = _plain_segment(leaves, s_leaf, chunk)
                *span_grads, d_state = torch.autograd.grad(
                    (piece_reads, s_end), [*leaves, s_leaf], (d_reads[:, span], d_state)
                )
                for grad, span_grad in zip(grads, span_grads, strict=True):
                    grad[:, span] = span_grad
        needed = [g if wanted else None for g, wanted in zip(grads, ctx.needs_input_grad, strict=False)]
        return (*needed, d_state, None)


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
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form of the memory recurrence; same contract as :func:`peft_deltamem.ops.delta_rule_scan`.

    Shapes: ``q, k, v`` [N, T, r]; ``keep, erase, write`` [N, T, r] or [N, T, 1] (broadcast over rows); ``state``
    [N, r, r] or None (zeros); ``mask`` [N, T] bool (True = valid) or None. Computed in float32; returns
    ``(reads [N, T, r] in q's dtype, final_state [N, r, r] float32)``, differentiable in every input.
    Gates are expected in [0, 1] (sigmoid outputs); keep = 0 is handled exactly (forward and gradients).
    ``chunk_size`` is the number of tokens C solved together (None: :func:`default_chunk_size` for the shape; a
    last shorter chunk takes the rest, no padding). Agrees with the recurrent form to float32 round-off; see the
    module docstring for the math.
    """
    if chunk_size is not None and chunk_size < 1:
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

    g = max(keep.shape[-1], erase.shape[-1])  # 1: every row shares the decays and the solve
    chunk = min(chunk_size or default_chunk_size(n, t_len, r, rowwise=g > 1), t_len)
    inputs = (q, k, v, keep, erase, write)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*inputs, s0)):
        reads, final_state = _ChunkedScan.apply(*inputs, s0, chunk)
    else:
        reads, final_state, _ = _run_segments(inputs, s0, chunk)
    if mask is not None:
        reads = torch.where(mask.to(torch.bool).unsqueeze(-1), reads, 0.0)
    return reads.to(out_dtype), final_state
