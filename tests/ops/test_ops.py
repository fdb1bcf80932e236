"""The memory recurrence as an operator (docs/design.md §1-§2).

(a) the recurrent operator against a plain per-token loop written here from §1 (explicit diag matrices, float64);
(b) the chunked operator against the recurrent one (reads, final state, gradients of every input incl. the state)
    over shapes, chunk sizes, masks, gate regimes, the three state-update modes, gate widths and dtypes;
(c) the ``auto`` dispatch; (d) argument errors and edge cases.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import peft_deltamem.ops as ops
import peft_deltamem.ops.chunked as chunked_mod
from peft_deltamem.ops import SCAN_IMPLS, delta_rule_scan
from peft_deltamem.ops.chunked import chunked_delta_rule_scan
from peft_deltamem.ops.recurrent import recurrent_delta_rule_scan

MODES = ("standard", "lambda_outside", "no_lambda")
REGIMES = ("uniform", "beta_near_0", "beta_near_1", "mixed", "saturated")
MASKS = ("none", "random", "chunk_edges", "all_masked_row", "left_pad")
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class Case:
    """Parameters of one random scan problem; the tensors are built from ``seed`` by :func:`make_inputs`."""

    n: int = 2
    t: int = 10
    r: int = 4
    chunk: int = 4
    mode: str = "standard"
    couple: bool = True  # keep = 1 − β (coupled λ) rather than an independent λ
    regime: str = "uniform"
    shared_gates: tuple[bool, bool, bool] = (False, False, False)  # per gate (keep, erase, write): [N,T,1] or [N,T,r]
    mask: str = "none"
    with_state: bool = True
    normalize: bool = True
    dtype: str = "float32"
    seed: int = 0
    segment_floats: int | None = None  # chunked: cut the sequence into segments of about this many floats per tensor


def _betas(regime: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    near_0 = 10 ** (-6 + 3 * u)  # 1e-6 .. 1e-3
    if regime == "uniform":
        return 0.02 + 0.96 * u
    if regime == "beta_near_0":
        return near_0
    if regime == "beta_near_1":
        return 1 - near_0
    if regime == "saturated":  # gates exactly 0 or 1 (sigmoids saturated in float32) among ordinary ones
        pick = torch.randint(0, 3, shape, generator=gen)
        return torch.where(pick == 0, 0.0, torch.where(pick == 1, 1.0, u))
    pick = torch.randint(0, 3, shape, generator=gen)  # "mixed": every token drawn from one of the three regimes
    return torch.where(pick == 0, near_0, torch.where(pick == 1, 1 - near_0, u))


def _mask(case: Case, gen: torch.Generator) -> torch.Tensor | None:
    n, t, c = case.n, case.t, case.chunk
    if case.mask == "none":
        return None
    pos = torch.arange(t).expand(n, t)
    if case.mask == "random":
        return torch.rand(n, t, generator=gen) > 0.3
    if case.mask == "chunk_edges":  # holes on the first and last token of every chunk, in every other sequence
        hole = (pos % c == 0) | (pos % c == c - 1)
        return ~(hole & (torch.arange(n) % 2 == 0).unsqueeze(1))
    if case.mask == "all_masked_row":  # sequence 0 entirely masked, the others random
        mask = torch.rand(n, t, generator=gen) > 0.3
        mask[0] = False
        return mask
    lengths = torch.randint(0, t + 1, (n,), generator=gen)  # "left_pad": left padding of random length
    return pos >= (t - lengths).unsqueeze(1)


def make_inputs(case: Case) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Leaves ``[q, k, v, keep, erase, write, state]`` (state may be None) whose gates follow ``case.mode``, and mask."""
    gen = torch.Generator().manual_seed(case.seed)
    n, t, r = case.n, case.t, case.r
    q = torch.randn(n, t, r, generator=gen, dtype=torch.float64)
    k = torch.randn(n, t, r, generator=gen, dtype=torch.float64)
    if case.normalize:  # as the layer does: l2norm(tanh(.))
        q, k = (torch.nn.functional.normalize(x.tanh(), dim=-1) for x in (q, k))
    else:  # raw q/k, norms around 1 (the delta rule with |k| > 1 and β≈1 is not contractive, so keep them modest)
        q, k = q / r**0.5, k / r**0.5
    v = torch.randn(n, t, r, generator=gen, dtype=torch.float64)
    widths = [1 if shared else r for shared in case.shared_gates]
    beta_e = _betas(case.regime, (n, t, widths[1]), gen)
    beta_w = _betas(case.regime, (n, t, widths[2]), gen)
    if case.couple:
        lam = 1 - _betas(case.regime, (n, t, widths[0]), gen)
    else:
        lam = torch.sigmoid(torch.randn(n, t, widths[0], generator=gen, dtype=torch.float64) * 3)
    if case.mode == "standard":
        keep, erase, write = lam, beta_e, beta_w
    elif case.mode == "lambda_outside":
        lam_e = lam if widths[0] == widths[1] else lam[..., :1].expand(n, t, widths[1])  # λ at erase's width
        keep, erase, write = lam, lam_e * beta_e, beta_w
    else:  # no_lambda
        keep, erase, write = torch.ones_like(lam), beta_e, beta_w
    state = torch.randn(n, r, r, generator=gen, dtype=torch.float64) if case.with_state else None
    dtype = getattr(torch, case.dtype)
    leaves = [x.to(dtype).requires_grad_() if x is not None else None for x in (q, k, v, keep, erase, write, state)]
    if state is not None:
        leaves[-1] = state.float().requires_grad_()  # the state is float32 whatever the model dtype
    return leaves, _mask(case, gen)


def _loss_and_grads(fn, leaves, mask, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Run ``fn``; gradients of a random linear function of (reads, final state) w.r.t. every leaf that exists."""
    reads, final = fn(*leaves, mask=mask, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    w_reads = torch.randn(reads.shape, generator=gen, dtype=torch.float64)
    w_state = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    loss = (reads.double() * w_reads).sum() + (final.double() * w_state).sum()
    inputs = [x for x in leaves if x is not None]
    if not loss.requires_grad:  # T = 0 and no state: nothing depends on the inputs
        return reads, final, [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]
    return reads, final, grads


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Absolute tolerance ``tol`` scaled by the magnitude of the expected values (at least 1)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs diff {err:.3g} > {tol:.1g} × {scale:.3g}"


GRAD_NAMES = ("q", "k", "v", "keep", "erase", "write", "state")


def _grad_names(leaves) -> list[str]:
    return [name for name, x in zip(GRAD_NAMES, leaves, strict=True) if x is not None]


# ----------------------------------------------------------------------------------------------------------------------
# (a) recurrent operator == the per-token loop of docs/design.md §1


def reference_scan(q, k, v, keep, erase, write, state=None, mask=None):
    """docs/design.md §1 token by token in float64, one sequence at a time, with explicit matrices:
    ``o_t = S q_t``;  ``S ← diag(keep_t) S − diag(erase_t) (S k_t) k_tᵀ + diag(write_t) v_t k_tᵀ``; masked: o_t = 0."""
    n, t_len, r = q.shape
    q, k, v = q.double(), k.double(), v.double()
    keep, erase, write = (g.double().expand(n, t_len, r) for g in (keep, erase, write))
    all_reads, finals = [], []
    for b in range(n):
        s = torch.zeros(r, r, dtype=torch.float64) if state is None else state[b].double()
        reads = []
        for t in range(t_len):
            if mask is not None and not bool(mask[b, t]):
                reads.append(torch.zeros(r, dtype=torch.float64))
                continue
            q_t, k_t, v_t = q[b, t].reshape(r, 1), k[b, t].reshape(r, 1), v[b, t].reshape(r, 1)
            reads.append((s @ q_t).reshape(r))
            s = (
                torch.diag(keep[b, t]) @ s
                - torch.diag(erase[b, t]) @ (s @ k_t) @ k_t.T
                + torch.diag(write[b, t]) @ v_t @ k_t.T
            )
        all_reads.append(torch.stack(reads) if reads else torch.zeros(0, r, dtype=torch.float64))
        finals.append(s)
    return torch.stack(all_reads), torch.stack(finals)


small_cases = st.builds(
    Case,
    n=st.integers(1, 3),
    t=st.integers(0, 14),
    r=st.integers(1, 5),
    mode=st.sampled_from(MODES),
    couple=st.booleans(),
    regime=st.sampled_from(REGIMES),
    shared_gates=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    mask=st.sampled_from(MASKS),
    with_state=st.booleans(),
    normalize=st.booleans(),
    dtype=st.just("float64"),
    seed=st.integers(0, 2**31 - 1),
)


@SETTINGS
@given(case=small_cases)
@example(case=Case(n=2, t=9, r=3, mode="lambda_outside", couple=False, mask="random", dtype="float64", seed=3))
@example(case=Case(n=2, t=6, r=4, mode="no_lambda", shared_gates=(True, True, True), mask="all_masked_row"))
def test_recurrent_matches_reference_loop(case: Case) -> None:
    leaves, mask = make_inputs(case)
    reads, final, grads = _loss_and_grads(recurrent_delta_rule_scan, leaves, mask, case.seed)
    ref_reads, ref_final, ref_grads = _loss_and_grads(reference_scan, leaves, mask, case.seed)
    assert reads.dtype == leaves[0].dtype and final.dtype == torch.float32
    # The operator computes in float32; the reference in float64.
    _assert_close(reads, ref_reads, 1e-5, "reads")
    _assert_close(final, ref_final, 1e-5, "final state")
    for name, g, ref_g in zip(_grad_names(leaves), grads, ref_grads, strict=True):
        _assert_close(g, ref_g, 1e-5, f"grad {name}")
    if mask is not None:
        assert (reads[~mask] == 0).all()


def test_reference_loop_semantics_by_hand() -> None:
    """Pin the reference itself on a 2×2 example computed by hand (read before write, row gates, masking)."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    v = torch.tensor([[[2.0, 3.0], [5.0, 7.0], [1.0, 1.0]]])
    keep = torch.tensor([[[0.5, 1.0], [1.0, 0.5], [1.0, 1.0]]])
    erase = torch.full((1, 3, 1), 0.5)
    write = torch.tensor([[[1.0, 0.5], [1.0, 1.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    # t0: read 0; S = [[2, 0], [1.5, 0]]. t1: read S q = [0, 0]; S k = 0 → S = diag(1, .5) S + v kᵀ = [[2, 5], [.75, 7]].
    expected_final = torch.tensor([[[2.0, 5.0], [0.75, 7.0]]], dtype=torch.float64)
    for fn in (reference_scan, recurrent_delta_rule_scan, chunked_delta_rule_scan):
        reads, final = fn(q, k, v, keep, erase, write, None, mask)
        assert torch.equal(reads.double(), torch.zeros(1, 3, 2, dtype=torch.float64)), fn
        torch.testing.assert_close(final.double(), expected_final)
    # Without the mask the third token reads row sums [7, 7.75] and is then written.
    reads, _ = recurrent_delta_rule_scan(q, k, v, keep, erase, write)
    torch.testing.assert_close(reads[0, 2], torch.tensor([7.0, 7.75]))


# ----------------------------------------------------------------------------------------------------------------------
# (b) chunked == recurrent


scan_cases = st.builds(
    Case,
    n=st.integers(1, 3),
    t=st.integers(1, 80),
    r=st.integers(1, 8),
    chunk=st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32, 64]),
    mode=st.sampled_from(MODES),
    couple=st.booleans(),
    regime=st.sampled_from(REGIMES),
    shared_gates=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    mask=st.sampled_from(MASKS),
    with_state=st.booleans(),
    normalize=st.booleans(),
    dtype=st.sampled_from(["float32", "float32", "bfloat16"]),
    seed=st.integers(0, 2**31 - 1),
    segment_floats=st.sampled_from([None, None, 1, 300, 4000]),
)


def _check_chunked_matches_recurrent(case: Case) -> None:
    leaves, mask = make_inputs(case)
    before = [None if x is None else x.detach().clone() for x in leaves]
    segment_floats = case.segment_floats or chunked_mod.SEGMENT_FLOATS
    with mock.patch.object(chunked_mod, "SEGMENT_FLOATS", segment_floats):
        reads, final, grads = _loss_and_grads(chunked_delta_rule_scan, leaves, mask, case.seed, chunk_size=case.chunk)
    ref_reads, ref_final, ref_grads = _loss_and_grads(recurrent_delta_rule_scan, leaves, mask, case.seed)
    for x, x0 in zip(leaves, before, strict=True):  # inputs are not modified in place
        assert x is None or torch.equal(x, x0)
    assert reads.dtype == leaves[0].dtype and final.dtype == torch.float32
    # Both compute in float32 from the same (upcast) inputs: they differ by float32 round-off, and for bf16 by one
    # rounding of the returned reads / of the gradients to bf16.
    tol = 1e-4 if case.dtype == "float32" else 2e-2
    _assert_close(reads, ref_reads, tol, "reads")
    _assert_close(final, ref_final, 1e-4, "final state")
    for name, g, ref_g in zip(_grad_names(leaves), grads, ref_grads, strict=True):
        assert g.dtype == ref_g.dtype, name
        _assert_close(g, ref_g, 1e-4 if g.dtype == torch.float32 else 2e-2, f"grad {name}")
    if mask is not None:
        assert (reads[~mask] == 0).all()
        if case.mask == "all_masked_row":  # a fully masked sequence leaves its state exactly as it was
            start = leaves[-1][0] if case.with_state else torch.zeros(case.r, case.r)
            assert torch.equal(final[0], start.float())


@SETTINGS
@given(case=scan_cases)
@example(case=Case(n=2, t=20, r=4, chunk=8, mask="chunk_edges", seed=1))  # chunk does not divide T
@example(case=Case(n=2, t=24, r=4, chunk=8, mask="chunk_edges", shared_gates=(True, False, True), seed=2))  # divides
@example(case=Case(n=1, t=5, r=3, chunk=64, regime="beta_near_1", mode="lambda_outside", seed=4))  # T < chunk
@example(case=Case(n=3, t=33, r=8, chunk=16, regime="mixed", mask="all_masked_row", dtype="bfloat16", seed=5))
@example(case=Case(n=2, t=50, r=5, chunk=16, regime="saturated", mask="random", seed=7))
@example(case=Case(n=2, t=40, r=8, chunk=16, regime="beta_near_0", mode="no_lambda", couple=False, seed=6))
def test_chunked_matches_recurrent(case: Case) -> None:
    _check_chunked_matches_recurrent(case)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_matches_recurrent_long(mode: str) -> None:
    """Several full chunks at the default chunk size, with padding, rank-wise gates and a left-padded batch."""
    _check_chunked_matches_recurrent(Case(n=2, t=200, r=8, chunk=64, mode=mode, regime="mixed", mask="left_pad"))


def test_chunked_keep_exactly_zero() -> None:
    """keep == 0 (a saturated gate): decays are products, not exp(log), so forward and every gradient (keep's too)
    match the recurrent form."""
    case = Case(n=2, t=30, r=4, chunk=8, mode="standard", couple=False, seed=11)
    leaves, mask = make_inputs(case)
    with torch.no_grad():
        zero = torch.rand(leaves[3].shape, generator=torch.Generator().manual_seed(0)) < 0.3
        leaves[3][zero] = 0.0
    reads, final, grads = _loss_and_grads(chunked_delta_rule_scan, leaves, mask, 0, chunk_size=8)
    ref_reads, ref_final, ref_grads = _loss_and_grads(recurrent_delta_rule_scan, leaves, mask, 0)
    _assert_close(reads, ref_reads, 1e-4, "reads")
    _assert_close(final, ref_final, 1e-4, "final state")
    for name, g, ref_g in zip(_grad_names(leaves), grads, ref_grads, strict=True):
        _assert_close(g, ref_g, 1e-4, f"grad {name}")
    assert ref_grads[3][zero].abs().max() > 1e-2  # the gradient at a zero keep is not trivially 0


@pytest.fixture
def segment_kinds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which form the chunked scan takes for each segment it runs forward: "factored" or "plain"."""
    kinds: list[str] = []
    factored, plain = chunked_mod._factored_forward, chunked_mod._plain_segment

    def spy_factored(*args, **kwargs):
        kinds.append("factored")
        return factored(*args, **kwargs)

    def spy_plain(*args, **kwargs):
        if torch.is_grad_enabled():  # the plain form's recomputation in the backward is not a forward segment
            return plain(*args, **kwargs)
        kinds.append("plain")
        return plain(*args, **kwargs)

    monkeypatch.setattr(chunked_mod, "_factored_forward", spy_factored)
    monkeypatch.setattr(chunked_mod, "_plain_segment", spy_plain)
    return kinds


@pytest.mark.parametrize(
    ("regime", "shared", "expected"),
    [
        ("beta_near_0", False, "factored"),  # keep ≈ 1: the factored form, per-row solves
        ("beta_near_0", True, "factored"),  # ... one solve shared by the rows
        ("uniform", False, "factored"),
        ("saturated", False, "plain"),  # keep = 0 somewhere: P' underflows, the plain form
        ("beta_near_1", True, "plain"),  # keep ≤ 1e-3
    ],
)
def test_chunked_factored_and_plain_forms(segment_kinds: list[str], regime: str, shared: bool, expected: str) -> None:
    """Each form is taken where it should be, and both match the token loop (reads, state, every gradient)."""
    case = Case(n=3, t=70, r=6, chunk=8, regime=regime, shared_gates=(shared,) * 3, mask="random", seed=21)
    _check_chunked_matches_recurrent(case)
    assert segment_kinds and set(segment_kinds) == {expected}


def test_chunked_mixed_segments(segment_kinds: list[str]) -> None:
    """Segments of one call may take different forms: a saturated keep gate in the middle of the sequence sends
    only its segment to the plain form; the state carried across the forms and the gradients stay exact."""
    case = Case(n=2, t=96, r=4, chunk=8, regime="beta_near_0", mode="lambda_outside", mask="random", seed=5)
    leaves, mask = make_inputs(case)
    with torch.no_grad():
        leaves[3][:, 40:44] = 0.0  # keep exactly 0 on a few tokens of the second segment (32 tokens each)
    # Forward segments of 4 chunks = 32 tokens ([N, 32, max(r, C)] = FORWARD_SEGMENTS × 128 floats); the plain form
    # cuts its segment into pieces of one chunk (at least one), and so does the factored backward.
    with mock.patch.object(chunked_mod, "SEGMENT_FLOATS", 2 * 32 * 8 // chunked_mod.FORWARD_SEGMENTS):
        reads, final, grads = _loss_and_grads(chunked_delta_rule_scan, leaves, mask, 0, chunk_size=8)
    assert segment_kinds == ["factored"] + ["plain"] * 4 + ["factored"]
    ref_reads, ref_final, ref_grads = _loss_and_grads(recurrent_delta_rule_scan, leaves, mask, 0)
    _assert_close(reads, ref_reads, 1e-5, "reads")
    _assert_close(final, ref_final, 1e-5, "final state")
    for name, g, ref_g in zip(_grad_names(leaves), grads, ref_grads, strict=True):
        _assert_close(g, ref_g, 1e-5, f"grad {name}")


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_empty_sequence_returns_input_state(impl: str) -> None:
    state = torch.randn(3, 4, 4)
    q = torch.zeros(3, 0, 4, dtype=torch.bfloat16)
    gates = torch.zeros(3, 0, 1)
    reads, final = delta_rule_scan(q, q, q, gates, gates, gates, state, impl=impl)
    assert reads.shape == (3, 0, 4) and reads.dtype == torch.bfloat16
    assert torch.equal(final, state)
    _, final = delta_rule_scan(q, q, q, gates, gates, gates, impl=impl)
    assert torch.equal(final, torch.zeros(3, 4, 4))


def test_chunked_rejects_bad_chunk_size() -> None:
    x = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_delta_rule_scan(x, x, x, x, x, x, chunk_size=0)


# ----------------------------------------------------------------------------------------------------------------------
# (c) auto dispatch, (d) invalid impl


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which implementation the dispatcher calls (the real functions still run)."""
    calls: list[str] = []

    def recurrent(*args, **kwargs):
        calls.append("recurrent")
        return recurrent_delta_rule_scan(*args, **kwargs)

    def chunked(*args, **kwargs):
        calls.append("chunked")
        return chunked_delta_rule_scan(*args, **kwargs)

    monkeypatch.setattr(ops, "recurrent_delta_rule_scan", recurrent)
    monkeypatch.setattr(chunked_mod, "chunked_delta_rule_scan", chunked)
    return calls


@pytest.mark.parametrize(
    ("impl", "t", "expected"),
    [("auto", 1, "recurrent"), ("auto", 15, "recurrent"), ("auto", 16, "chunked"), ("auto", 100, "chunked")]
    + [("recurrent", 50, "recurrent"), ("chunked", 1, "chunked"), ("chunked", 7, "chunked")],
)
def test_dispatch(spy: list[str], impl: str, t: int, expected: str) -> None:
    leaves, _ = make_inputs(Case(n=2, t=t, r=3, chunk=4))
    reads, final = delta_rule_scan(*leaves, impl=impl, chunk_size=4)
    assert spy == [expected]
    assert reads.shape == (2, t, 3) and final.shape == (2, 3, 3)


@pytest.mark.parametrize(
    ("n", "t", "r", "grad", "expected"),
    [
        (1, 15, 8, True, "recurrent"),
        (1, 16, 8, True, "chunked"),
        (16, 16, 32, True, "chunked"),
        (1, 16, 8, False, "recurrent"),  # a forward alone: the token loop up to 31 tokens
        (16, 31, 32, False, "recurrent"),
        (16, 32, 32, False, "chunked"),
    ],
)
def test_auto_rule(spy: list[str], n: int, t: int, r: int, grad: bool, expected: str) -> None:
    """The measured crossover (docs/benchmarks.md): auto_impl decides, and the dispatcher follows it, with and without
    gradients."""
    assert ops.auto_impl(n, t, r, grad=grad) == expected
    leaves, _ = make_inputs(Case(n=n, t=t, r=r))
    with torch.set_grad_enabled(grad):
        delta_rule_scan(*leaves)
    assert spy == [expected]


def test_dispatch_passes_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def chunked(*args, chunk_size):
        seen["chunk_size"] = chunk_size
        return chunked_delta_rule_scan(*args, chunk_size=chunk_size)

    monkeypatch.setattr(chunked_mod, "chunked_delta_rule_scan", chunked)
    leaves, _ = make_inputs(Case(n=1, t=20, r=2))
    delta_rule_scan(*leaves, chunk_size=5)
    assert seen == {"chunk_size": 5}
    delta_rule_scan(*leaves)  # None: the chunked form picks the chunk size for the shape
    assert seen == {"chunk_size": None}


def test_default_chunk_size_rule() -> None:
    """C is 64 up to 8 independent rows (N·r with rank-wise gates, N with shared ones), else 32; never above T."""
    rule = chunked_mod.default_chunk_size
    assert [rule(1, 4096, 8), rule(4, 4096, 8), rule(16, 4096, 16), rule(16, 4096, 32)] == [64, 32, 32, 32]
    assert rule(16, 4096, 32, rowwise=False) == 32 and rule(8, 4096, 32, rowwise=False) == 64
    assert rule(1, 10, 8) == 10


@pytest.mark.parametrize("impl", ["fast", "Chunked", "", None])
def test_invalid_impl_raises(impl) -> None:
    leaves, _ = make_inputs(Case(n=1, t=3, r=2))
    with pytest.raises(ValueError) as info:
        delta_rule_scan(*leaves, impl=impl)
    message = str(info.value)
    assert set(SCAN_IMPLS) == {"auto", "recurrent", "chunked"}
    for name in SCAN_IMPLS:
        assert name in message
