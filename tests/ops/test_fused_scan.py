"""The chunked scan's fused per-row solve (peft_deltamem.ops.fused.row_solve): it solves the systems the eager path
forms, the chunked scan with it still equals the token loop, and it is used exactly where it applies. Building the C++
extension takes about a minute the first time (then torch caches it): marked slow."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import peft_deltamem.ops.chunked as chunked_mod
from peft_deltamem.ops import delta_rule_scan, fused
from tests.ops.test_ops import SETTINGS, Case, _check_chunked_matches_recurrent, make_inputs, scan_cases

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fused_scan():
    fused.enable_fused_scan()
    yield
    fused.disable_fused_scan()


def _reference_solve(gram, p_out, erase_p, rhs, transpose: bool) -> torch.Tensor:
    """The systems written out (docs: peft_deltamem/ops/chunked.py, the factored form) and solved in float64, one per
    row i (a column of the token-major [N, C, R] operands)."""
    n, c, rows = rhs.shape
    rows_first = [t.double().expand(n, c, rows).mT for t in (p_out, erase_p, rhs)]  # [N, R, C]
    system = rows_first[1].unsqueeze(-1) * gram.double().tril(-1).unsqueeze(1)
    system = system + torch.diag_embed(rows_first[0])
    if transpose:
        system = system.mT
    return torch.linalg.solve(system, rows_first[2].unsqueeze(-1)).squeeze(-1).mT


@SETTINGS
@given(
    n=st.integers(1, 3),
    rows=st.integers(1, 9),
    c=st.integers(1, 40),
    shared_p=st.booleans(),
    transpose=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_row_solve_solves_the_per_row_systems(fused_scan, n, rows, c, shared_p, transpose, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(n, c, 8, generator=gen), dim=-1)
    gram = torch.stack([k @ k.mT, torch.full((n, c, c), float("nan"))], 1)[:, 0]  # one chunk of a segment: strided
    p_out = 0.5 + 0.5 * torch.rand(n, c, 1 if shared_p else rows, generator=gen)  # a row-shared keep: [N, C, 1]
    erase_p = torch.rand(n, c, rows, generator=gen)
    rhs = torch.randn(n, 2 * c, rows, generator=gen)[:, ::2]  # strided, as a chunk of a longer segment is
    x = fused.row_solve(gram, p_out, erase_p, rhs, transpose)
    expected = _reference_solve(gram, p_out, erase_p, rhs, transpose)
    assert x.shape == (n, c, rows) and x.dtype == torch.float32
    torch.testing.assert_close(x.double(), expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=0)


def test_row_solve_declines_what_is_not_float32(fused_scan) -> None:
    """The caller then solves eagerly: None, not a wrong answer or an error."""
    gram, p_out, erase_p, rhs = torch.eye(4)[None], torch.ones(1, 4, 2), torch.ones(1, 4, 2), torch.ones(1, 4, 2)
    assert fused.row_solve(gram.double(), p_out, erase_p, rhs, False) is None
    assert fused.row_solve(gram, p_out, erase_p, rhs.half(), True) is None


rowwise_cases = scan_cases.filter(lambda case: not all(case.shared_gates[:2]))  # one system per row


@SETTINGS
@given(case=rowwise_cases)
@example(case=Case(n=2, t=70, r=8, chunk=16, regime="mixed", mask="left_pad", seed=3))
@example(case=Case(n=2, t=40, r=5, chunk=8, shared_gates=(True, False, True), mode="lambda_outside", seed=4))
@example(case=Case(n=3, t=33, r=8, chunk=16, mask="all_masked_row", dtype="bfloat16", segment_floats=300, seed=5))
def test_the_chunked_scan_with_the_fused_solve_matches_the_token_loop(fused_scan, case: Case) -> None:
    _check_chunked_matches_recurrent(case)


@pytest.mark.parametrize(("shared", "calls"), [((False, False, False), 6), ((True, True, False), 0)])
def test_the_fused_solve_is_taken_where_there_is_one_system_per_row(fused_scan, monkeypatch, shared, calls) -> None:
    """Rank-wise gates: one fused solve per chunk forward and one per chunk backward (T 24, chunks of 8). Row-shared
    keep and erase gates have a single system per chunk, which the eager solver takes with the rows as right-hand
    sides: no fused call. The results equal those without the fused solve."""
    called = []
    original = fused.row_solve
    monkeypatch.setattr(chunked_mod, "row_solve", lambda *a: called.append(a[-1]) or original(*a))
    leaves, _ = make_inputs(Case(n=2, t=24, r=4, shared_gates=shared, seed=9))

    def run() -> list[torch.Tensor]:
        reads, final = delta_rule_scan(*leaves, impl="chunked", chunk_size=8)
        return [reads, final, *torch.autograd.grad(reads.sum() + final.square().sum(), leaves)]

    with_fused = run()
    assert called == [False] * (calls // 2) + [True] * (calls // 2)  # forward solves, then transposed ones
    fused.disable_fused_scan()
    try:
        eager = run()
    finally:
        fused.enable_fused_scan()
    assert len(called) == calls
    for got, want in zip(with_fused, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
