"""Benchmark the memory recurrence: recurrent (token by token) vs chunked (chunkwise-parallel), docs/design.md §2.

    python benchmarks/scan.py --threads 1 [--docs docs/benchmarks.md] [--smoke] [--out benchmarks/results/scan.json]
    python benchmarks/scan.py --threads 1 --fused-scan [--r 32 --n 16] --out benchmarks/results/scan_fused.json

For every (T, r, N) of the grid it times, interleaved round by round (so load on a shared machine falls on all of
them alike), the forward (under ``torch.no_grad``, the prefill path) and the forward+backward (gradients of a fixed
random linear function of the reads and the final state w.r.t. q, k, v, the three gates and the initial state: the
training path) of both implementations, and reports their median times, the speed-up (recurrent / chunked), the
max abs difference between the two in reads, final state and every gradient, the chunked forward+backward's peak
memory (in a fresh subprocess), and how far each time is from the machine's roofline limit:

- FLOPs of the operator: the token loop's multiply-adds, 7·N·T·r² for the forward (per token and state row: the
  read s·q and s·k, 2r each, and the update keep·s + u·k, 3r), three times that for forward+backward (the adjoint
  recurrence does two such products per forward one);
- bytes of the operator: its least memory traffic in float32, every input read once and the reads and final state
  written once for the forward, twice that with the backward (the gradients of the outputs read, one gradient per
  input written);
- limit = the longer of FLOPs / the single-core float32 matmul throughput and bytes / the copy bandwidth of a
  buffer far larger than the caches, both measured in the same run (the best before and after the grid), so
  "% of limit" = limit / measured time.

Plus one extra shape for the ≥ 20× bar: T 8192, r 8, N 1 with a random mask (30 % of tokens masked) and an initial
state. Inputs look like the layer's: q, k = l2norm(tanh(·)), β = sigmoid(· − 1.5) rank-wise, keep = 1 − β (standard
mode, coupled λ), a random initial state. The chunked form runs with its default chunk size for the shape
(``chunk_size=None``); a sweep over chunk sizes on three shapes shows what that rule picks from.

``--fused-scan`` runs the chunked form with the fused per-row solve (:func:`peft_deltamem.ops.enable_fused_scan`,
opt-in C++, built first); ``--r`` / ``--n`` keep only those ranks / row counts of the grid (and skip the chunk-size
sweep and the short-sequence crossover).

``--docs PATH`` rewrites the part of PATH between ``<!-- scan-results:begin -->`` and ``<!-- scan-results:end -->``
with the tables of this run.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # run from a checkout without installing: `python benchmarks/scan.py`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import _timing  # noqa: E402

from peft_deltamem.ops import auto_impl, delta_rule_scan  # noqa: E402
from peft_deltamem.ops.chunked import default_chunk_size  # noqa: E402

FULL = {
    "T": (512, 2048, 8192),
    "r": (8, 16, 32),
    "N": (1, 4, 16),
    "masked": (8192, 8, 1),
    "chunk_sweep_T": 2048,
    "chunk_sweep_shapes": ((8, 1), (16, 4), (32, 16)),
    "chunk_sweep": (16, 32, 64),
    "crossover_T": (4, 8, 16, 32, 64),
    "crossover_shapes": ((8, 1), (32, 16)),
}
SMOKE = {
    "T": (40, 130),
    "r": (4,),
    "N": (1, 2),
    "masked": (130, 4, 1),
    "chunk_sweep_T": 130,
    "chunk_sweep_shapes": ((4, 2),),
    "chunk_sweep": (8, 64),
    "crossover_T": (4, 16),
    "crossover_shapes": ((4, 1),),
}
IMPLS = ("recurrent", "chunked")
GRAD_NAMES = ("q", "k", "v", "keep", "erase", "write", "state")
MASKED_FRACTION = 0.3
BARS = {"fwd_speedup": 1.0, "fwdbwd_speedup": 5.0, "masked_fwdbwd_speedup": 20.0, "peak_mb": 64.0}
PEAK_BAR_SHAPE = (8192, 16, 4)  # (T, r, N)
DOCS_BEGIN, DOCS_END = "<!-- scan-results:begin -->", "<!-- scan-results:end -->"

SHAPE_COLUMNS = {"T": "T", "r": "r", "N": "N", "chunk_size": "C"}
COLUMNS = {
    **SHAPE_COLUMNS,
    "fwd_speedup": "fwd ×",
    "fwd_chunked_limit_pct": "fwd chunked % of limit",
    "fwd_recurrent_limit_pct": "fwd recurrent % of limit",
    "fwdbwd_speedup": "fwd+bwd ×",
    "fwdbwd_chunked_limit_pct": "fwd+bwd chunked % of limit",
    "fwdbwd_recurrent_limit_pct": "fwd+bwd recurrent % of limit",
    "chunked_fwdbwd_peak_mb": "chunked fwd+bwd peak MB",
    "max_diff": "max abs diff",
}
CROSSOVER_COLUMNS = {
    "T": "T",
    "r": "r",
    "N": "N",
    "fwd_speedup": "fwd ×",
    "auto_fwd": "auto (fwd)",
    "fwdbwd_speedup": "fwd+bwd ×",
    "auto_fwdbwd": "auto (fwd+bwd)",
}
SWEEP_COLUMNS = {
    "T": "T",
    "r": "r",
    "N": "N",
    "chunk_size": "chunk size",
    "fwd_rel": "fwd time / best",
    "fwdbwd_rel": "fwd+bwd time / best",
    "picked": "default",
}


def make_inputs(n: int, t: int, r: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Leaves ``[q, k, v, keep, erase, write, state]`` shaped like one adapted layer's scan (standard mode)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    q = torch.nn.functional.normalize(randn(n, t, r).tanh(), dim=-1)
    k = torch.nn.functional.normalize(randn(n, t, r).tanh(), dim=-1)
    v = randn(n, t, r)
    beta = torch.sigmoid(randn(n, t, r) - 1.5)
    keep, erase, write = 1 - beta, beta.clone(), beta.clone()
    state = 0.1 * randn(n, r, r)
    return [x.to(device).requires_grad_() for x in (q, k, v, keep, erase, write, state)]


def make_mask(n: int, t: int, device: torch.device, seed: int = 2) -> torch.Tensor:
    """A random mask with :data:`MASKED_FRACTION` of the tokens invalid."""
    return (torch.rand(n, t, generator=torch.Generator().manual_seed(seed)) >= MASKED_FRACTION).to(device)


def _weights(n: int, t: int, r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, t, r, generator=gen).to(device), torch.randn(n, r, r, generator=gen).to(device)


def scan_flops(n: int, t: int, r: int) -> dict[str, float]:
    """The operator's arithmetic: 7·N·T·r² FLOPs forward (per token and row: s·q, s·k and the update), ×3 with the
    backward."""
    fwd = 7.0 * n * t * r * r
    return {"fwd": fwd, "fwdbwd": 3.0 * fwd}


def scan_bytes(n: int, t: int, r: int, gate_width: int) -> dict[str, float]:
    """The operator's least memory traffic in bytes (float32): the forward reads q, k, v, the three gates and the
    initial state once and writes the reads and the final state; with the backward it also reads the gradients of
    the reads and of the final state and writes a gradient for every input."""
    inputs = n * t * (3 * r + 3 * gate_width) + n * r * r
    outputs = n * t * r + n * r * r
    return {"fwd": 4.0 * (inputs + outputs), "fwdbwd": 4.0 * 2 * (inputs + outputs)}


def add_limits(row: dict[str, Any], gflops: float, gbs: float) -> None:
    """The roofline limit of the row's shape (its FLOPs at ``gflops``, its least traffic at ``gbs``, whichever takes
    longer), and how close each measured time comes to it."""
    flops = scan_flops(row["N"], row["T"], row["r"])
    traffic = scan_bytes(row["N"], row["T"], row["r"], gate_width=row["r"])  # rank-wise gates, as make_inputs
    for mode in ("fwd", "fwdbwd"):
        limit_s, bound = _timing.roofline_s(flops[mode], traffic[mode], gflops, gbs)
        row[f"{mode}_flops"], row[f"{mode}_bytes"], row[f"{mode}_bound"] = flops[mode], traffic[mode], bound
        row[f"{mode}_limit_ms"] = limit_s * 1e3
        for impl in IMPLS:
            row[f"{mode}_{impl}_limit_pct"] = 100.0 * limit_s / (row[f"{mode}_{impl}_ms"] / 1e3)


def _bounds(rows: Sequence[dict[str, Any]]) -> str:
    """How many of the grid's (shape, mode) limits memory traffic sets, in words (arithmetic sets the rest)."""
    bounds = [row[f"{mode}_bound"] for row in rows for mode in ("fwd", "fwdbwd")]
    return f"memory traffic sets {bounds.count('memory')} of the grid's {len(bounds)} limits, arithmetic the rest"


def _shape_calls(
    leaves: list[torch.Tensor], mask: torch.Tensor | None, w_reads: torch.Tensor, w_state: torch.Tensor, last: dict
) -> dict[str, Callable[[], None]]:
    """The four timed calls of one shape; each forward+backward leaves its result in ``last[impl]``."""

    def forward(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
        return delta_rule_scan(*leaves, mask=mask, impl=impl, chunk_size=None)

    def fwd(impl: str) -> None:
        with torch.no_grad():
            forward(impl)

    def fwd_bwd(impl: str) -> None:
        reads, final = forward(impl)
        loss = (reads * w_reads).sum() + (final * w_state).sum()
        last[impl] = (reads.detach(), final.detach(), torch.autograd.grad(loss, leaves))

    calls = {}
    for impl in IMPLS:
        calls[f"fwd_{impl}"] = lambda impl=impl: fwd(impl)
        calls[f"fwdbwd_{impl}"] = lambda impl=impl: fwd_bwd(impl)
    return calls


def run_case(
    n: int,
    t: int,
    r: int,
    *,
    device: torch.device,
    rounds: int,
    masked: bool = False,
    peak: Callable[[int, int, int, bool], dict[str, Any]],
) -> dict[str, Any]:
    """Time both implementations on one shape, interleaved; compare their outputs and gradients; peak memory."""
    leaves = make_inputs(n, t, r, device)
    mask = make_mask(n, t, device) if masked else None
    w_reads, w_state = _weights(n, t, r, device)
    last: dict[str, Any] = {}
    timings = _timing.interleaved(_shape_calls(leaves, mask, w_reads, w_state, last), rounds=rounds, warmup=1)

    row: dict[str, Any] = {"T": t, "r": r, "N": n, "chunk_size": default_chunk_size(n, t, r), "rounds": rounds}
    if masked:
        row["masked_fraction"] = MASKED_FRACTION
    for mode in ("fwd", "fwdbwd"):
        for impl in IMPLS:
            timing = timings[f"{mode}_{impl}"]
            row[f"{mode}_{impl}_ms"] = timing["median_s"] * 1e3
            row[f"{mode}_{impl}_times_s"] = timing["times_s"]
        row[f"{mode}_speedup"] = row[f"{mode}_recurrent_ms"] / row[f"{mode}_chunked_ms"]

    (rec_reads, rec_final, rec_grads), (chk_reads, chk_final, chk_grads) = last["recurrent"], last["chunked"]
    row["max_diff_reads"] = (rec_reads - chk_reads).abs().max().item()
    row["max_diff_state"] = (rec_final - chk_final).abs().max().item()
    grad_diffs = {name: (a - b).abs().max().item() for name, a, b in zip(GRAD_NAMES, rec_grads, chk_grads, strict=True)}
    row["max_diff_grads"] = max(grad_diffs.values())
    row["max_diff_grad_by_input"] = grad_diffs
    row["max_diff"] = max(row["max_diff_reads"], row["max_diff_state"], row["max_diff_grads"])
    last.clear()
    measured = peak(n, t, r, masked)
    row["chunked_fwdbwd_peak_mb"] = measured["peak_mb"]
    row["peak_method"] = measured["method"]
    return row


def _chunk_size_calls(
    leaves: list[torch.Tensor], w_reads: torch.Tensor, w_state: torch.Tensor, sizes: Sequence[int]
) -> dict[tuple[str, int], Callable[[], None]]:
    """The chunked form's forward and forward+backward at each chunk size, on one shape."""

    def fwd(size: int) -> None:
        with torch.no_grad():
            delta_rule_scan(*leaves, impl="chunked", chunk_size=size)

    def fwd_bwd(size: int) -> None:
        reads, final = delta_rule_scan(*leaves, impl="chunked", chunk_size=size)
        torch.autograd.grad((reads * w_reads).sum() + (final * w_state).sum(), leaves)

    calls: dict[tuple[str, int], Callable[[], None]] = {}
    for size in sizes:
        calls[("fwd", size)] = lambda size=size: fwd(size)
        calls[("fwdbwd", size)] = lambda size=size: fwd_bwd(size)
    return calls


def chunk_sweep(
    t: int, shapes: Sequence[tuple[int, int]], sizes: Sequence[int], *, device: torch.device, rounds: int
) -> list[dict[str, Any]]:
    """Chunked form only: forward and forward+backward time against the chunk size (interleaved), per shape."""
    rows = []
    for r, n in shapes:
        calls = _chunk_size_calls(make_inputs(n, t, r, device), *_weights(n, t, r, device), sizes)
        timings = _timing.interleaved(calls, rounds=rounds, warmup=1)
        best = {mode: min(timings[(mode, size)]["median_s"] for size in sizes) for mode in ("fwd", "fwdbwd")}
        picked = default_chunk_size(n, t, r)
        for size in sizes:
            row = {"T": t, "r": r, "N": n, "chunk_size": size, "picked": "yes" if size == picked else ""}
            for mode in ("fwd", "fwdbwd"):
                median = timings[(mode, size)]["median_s"]
                row[f"{mode}_chunked_ms"] = median * 1e3
                row[f"{mode}_rel"] = median / best[mode]
            rows.append(row)
    return rows


def crossover(
    ts: Sequence[int], shapes: Sequence[tuple[int, int]], *, device: torch.device, rounds: int
) -> list[dict[str, Any]]:
    """Short sequences: recurrent / chunked time (interleaved) and what ``impl="auto"`` picks, with and without a
    backward, to check the auto rule against the crossover."""
    rows = []
    for r, n in shapes:
        for t in ts:
            leaves = make_inputs(n, t, r, device)
            calls = _shape_calls(leaves, None, *_weights(n, t, r, device), {})
            timings = _timing.interleaved(calls, rounds=rounds, warmup=2)
            row: dict[str, Any] = {"T": t, "r": r, "N": n}
            for mode in ("fwd", "fwdbwd"):
                medians = {impl: timings[f"{mode}_{impl}"]["median_s"] for impl in IMPLS}
                row[f"{mode}_speedup"] = medians["recurrent"] / medians["chunked"]
                row[f"auto_{mode}"] = auto_impl(n, t, r, grad=mode == "fwdbwd")
            rows.append(row)
    return rows


def _probe(spec: str, device: torch.device) -> None:
    """Subprocess side of the memory probe: peak memory of one chunked forward+backward ``T,r,N[,masked]``."""
    t, r, n, masked = (*map(int, spec.split(",")), 0)[:4]
    leaves = make_inputs(n, t, r, device)
    mask = make_mask(n, t, device) if masked else None
    w_reads, w_state = _weights(n, t, r, device)

    def fwd_bwd() -> None:
        reads, final = delta_rule_scan(*leaves, mask=mask, impl="chunked")
        torch.autograd.grad((reads * w_reads).sum() + (final * w_state).sum(), leaves)

    fwd_bwd()  # warm-up: one-time allocations (thread pools, LAPACK workspaces) are not the scan's
    _timing.print_probe(_timing.peak_mb(fwd_bwd))


def summarize_bars(rows: Sequence[dict[str, Any]], masked: dict[str, Any]) -> dict[str, Any]:
    """The acceptance bars of issue 17 on this run: worst and best ratios with their shapes, and whether each holds."""

    def shape(row: dict[str, Any]) -> str:
        return f"T {row['T']}, r {row['r']}, N {row['N']}"

    out: dict[str, Any] = {}
    for key in ("fwd_speedup", "fwdbwd_speedup"):
        worst, best = min(rows, key=lambda row: row[key]), max(rows, key=lambda row: row[key])
        out[key] = {
            "bar": BARS[key],
            "met": all(row[key] >= BARS[key] for row in rows),
            "worst": worst[key],
            "worst_shape": shape(worst),
            "best": best[key],
            "best_shape": shape(best),
            "below_bar": [shape(row) for row in rows if row[key] < BARS[key]],
        }
    out["masked_fwdbwd_speedup"] = {
        "bar": BARS["masked_fwdbwd_speedup"],
        "met": masked["fwdbwd_speedup"] >= BARS["masked_fwdbwd_speedup"],
        "value": masked["fwdbwd_speedup"],
        "shape": shape(masked) + ", random mask, initial state",
    }
    peak_rows = [row for row in rows if (row["T"], row["r"], row["N"]) == PEAK_BAR_SHAPE]
    if peak_rows:
        out["peak_mb"] = {
            "bar": BARS["peak_mb"],
            "met": peak_rows[0]["chunked_fwdbwd_peak_mb"] <= BARS["peak_mb"],
            "value": peak_rows[0]["chunked_fwdbwd_peak_mb"],
            "shape": shape(peak_rows[0]),
        }
    out["max_diff"] = max(row["max_diff"] for row in [*rows, masked])
    return out


def _bar_lines(bars: dict[str, Any]) -> list[str]:
    lines = []
    names = {"fwd_speedup": "forward", "fwdbwd_speedup": "forward+backward"}
    for key, name in names.items():
        bar = bars[key]
        lines.append(
            f"- {name} ≥ {bar['bar']:g}× at every shape: **{'met' if bar['met'] else 'not met'}** — worst"
            f" {bar['worst']:.2f}× ({bar['worst_shape']}), best {bar['best']:.1f}× ({bar['best_shape']})"
            + (f"; below the bar: {'; '.join(bar['below_bar'])}" if bar["below_bar"] else "")
            + "."
        )
    masked = bars["masked_fwdbwd_speedup"]
    lines.append(
        f"- forward+backward ≥ {masked['bar']:g}× at {masked['shape']}: **{'met' if masked['met'] else 'not met'}**"
        f" — {masked['value']:.1f}×."
    )
    if "peak_mb" in bars:
        peak = bars["peak_mb"]
        lines.append(
            f"- chunked forward+backward peak ≤ {peak['bar']:g} MB at {peak['shape']}:"
            f" **{'met' if peak['met'] else 'not met'}** — {peak['value']:.1f} MB."
        )
    lines.append(f"- largest difference from the token loop (reads, state, every gradient): {bars['max_diff']:.1e}.")
    return lines


def update_docs(path: Path, text: str) -> None:
    """Replace what lies between :data:`DOCS_BEGIN` and :data:`DOCS_END` in ``path`` with ``text``."""
    doc = path.read_text()
    pattern = re.compile(re.escape(DOCS_BEGIN) + r".*?" + re.escape(DOCS_END), re.S)
    if not pattern.search(doc):
        raise ValueError(f"{path}: no {DOCS_BEGIN} ... {DOCS_END} section to update")
    path.write_text(pattern.sub(lambda _: f"{DOCS_BEGIN}\n{text}\n{DOCS_END}", doc))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the markdown tables, write the JSON (and the docs section); returns the JSON object."""
    parser = _timing.benchmark_parser(__doc__, "scan")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default 5; smoke 1)")
    parser.add_argument("--slow-rounds", type=int, default=3, help="timed rounds at the grid's largest T")
    parser.add_argument("--docs", type=Path, default=None, help="rewrite this file's scan results section")
    parser.add_argument("--fused-scan", action="store_true", help="chunked form with the fused C++ per-row solve")
    parser.add_argument("--r", type=int, nargs="+", default=None, help="only these ranks of the grid")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="only these row counts N of the grid")
    _timing.add_probe_args(parser, ("SHAPE", "IMPL"))
    args = _timing.parse_args(parser, argv)
    device = torch.device(args.device)
    if args.fused_scan:
        from peft_deltamem.ops import enable_fused_scan

        enable_fused_scan()
    if args.probe:
        _probe(args.probe[0], device)
        return {}
    grid = dict(SMOKE if args.smoke else FULL)
    subset = bool(args.r or args.n)
    if subset and args.docs:
        parser.error("--docs rewrites the tables of the whole grid: leave out --r and --n")
    grid.update({"r": tuple(args.r or grid["r"]), "N": tuple(args.n or grid["N"])})
    rounds = args.rounds or (1 if args.smoke else 5)
    slow_rounds = min(rounds, args.slow_rounds)

    def peak(n: int, t: int, r: int, masked: bool) -> dict[str, Any]:
        probe = ["--device", args.device, "--probe", f"{t},{r},{n},{int(masked)}", "chunked"]
        probe += ["--fused-scan"] if args.fused_scan else []
        return _timing.measure_peak(
            lambda: None, Path(__file__), probe, in_process=args.in_process_memory, threads=args.threads
        )

    machine = _timing.start_report("scan benchmark", args.smoke, device)
    gflops_start, gbs_start = _timing.matmul_gflops(device), _timing.memory_bandwidth_gbs(device)
    print(f"matmul {gflops_start:.1f} GFLOP/s, copy {gbs_start:.1f} GB/s", flush=True)  # the limit: add_limits
    rows = []
    for t in grid["T"]:
        for r in grid["r"]:
            for n in grid["N"]:
                row = run_case(
                    n,
                    t,
                    r,
                    device=device,
                    rounds=slow_rounds if t == max(grid["T"]) else rounds,
                    peak=peak,
                )
                rows.append(row)
                print(
                    f"T={t} r={r} N={n}: fwd {row['fwd_speedup']:.2f}×, fwd+bwd {row['fwdbwd_speedup']:.1f}×,"
                    f" peak {row['chunked_fwdbwd_peak_mb']:.1f} MB, max diff {row['max_diff']:.1e}",
                    flush=True,
                )
    t, r, n = grid["masked"]
    masked = run_case(n, t, r, device=device, rounds=slow_rounds, masked=True, peak=peak)
    print(f"masked T={t} r={r} N={n}: fwd+bwd {masked['fwdbwd_speedup']:.1f}×", flush=True)
    sweep, cross = [], []
    if not subset:  # the chunk-size sweep and the short-sequence crossover are about the whole grid
        sweep_rounds, cross_rounds = min(rounds, 3), max(rounds, 5) * 2
        sweep = chunk_sweep(
            grid["chunk_sweep_T"], grid["chunk_sweep_shapes"], grid["chunk_sweep"], device=device, rounds=sweep_rounds
        )
        cross = crossover(grid["crossover_T"], grid["crossover_shapes"], device=device, rounds=cross_rounds)
    gflops_end, gbs_end = _timing.matmul_gflops(device), _timing.memory_bandwidth_gbs(device)
    gflops, gbs = max(gflops_start, gflops_end), max(gbs_start, gbs_end)
    for row in (*rows, masked):  # the limit: the best throughputs measured in the run
        add_limits(row, gflops, gbs)
    bars = summarize_bars(rows, masked)

    notes = [
        "Times are medians of interleaved rounds (each round calls recurrent/chunked × fwd/fwd+bwd once, in turn),"
        f" after 1 warm-up round: {rounds} rounds, {slow_rounds} at T = {max(grid['T'])}; wall clock, one thread.",
        "fwd = forward under torch.no_grad; fwd+bwd = forward + torch.autograd.grad w.r.t. q, k, v, keep, erase,"
        " write and the initial state.",
        "× = recurrent time / chunked time; C = the chunked form's chunk size for the shape (its default rule).",
        "% of limit = roofline limit / measured time; limit = the longer of FLOPs / matmul throughput"
        " (7·N·T·r² FLOPs forward, ×3 for fwd+bwd) and least traffic / copy bandwidth (float32: inputs read once,"
        " reads and final state written; twice that with the backward's gradients)."
        f" Best of this run: {gflops:.0f} GFLOP/s ({gflops_start:.0f} before the grid, {gflops_end:.0f} after),"
        f" {gbs:.1f} GB/s ({gbs_start:.1f} before, {gbs_end:.1f} after); {_bounds(rows)}.",
        "Peak MB: resident-set growth during one chunked fwd+bwd after a warm-up call, in a fresh subprocess"
        " (glibc malloc returning freed memory at once): the inputs, allocated before, are not counted; the"
        " gradients it returns are.",
        "max abs diff: largest difference recurrent vs chunked over reads, final state and every gradient.",
        "Inputs: gates [N, T, r] (rank-wise), standard mode, keep = 1 - beta, initial state 0.1·randn; float32.",
    ]
    if args.fused_scan:
        notes.append("The chunked form solves its per-row systems with the fused C++ solve (--fused-scan).")
    machine["load_average_end"] = _timing.load_average()
    table_rows = [*rows, {**masked, "T": f"{masked['T']} (masked)"}]
    table = _timing.markdown_table(table_rows, COLUMNS)
    sweep_table = _timing.markdown_table(sweep, SWEEP_COLUMNS)
    bar_lines = _bar_lines(bars)
    sweep_title = f"Chunked form against the chunk size (T = {grid['chunk_sweep_T']}, median of up to 3 rounds):"
    cross_table = _timing.markdown_table(cross, CROSSOVER_COLUMNS)
    cross_title = 'Short sequences: recurrent / chunked and what `impl="auto"` runs:'
    extra = [sweep_title, "", sweep_table, "", cross_title, "", cross_table, "", *bar_lines, ""]
    _timing.print_report(table_rows, COLUMNS, notes, extra)
    result = {
        "benchmark": "scan",
        "smoke": args.smoke,
        "machine": machine,
        "settings": {
            "rounds": rounds,
            "slow_rounds": slow_rounds,
            "grid": grid,
            "device": str(device),
            "fused_scan": args.fused_scan,
            "matmul_gflops": {"start": gflops_start, "end": gflops_end, "used": gflops},
            "copy_gbs": {"start": gbs_start, "end": gbs_end, "used": gbs},
            "flops": "7*N*T*r^2 forward, 3x that forward+backward",
            "bytes": "float32 inputs + outputs once forward, twice forward+backward",
        },
        "notes": notes,
        "bars": bars,
        "rows": rows,
        "masked": masked,
        "chunk_sweep": sweep,
        "crossover": cross,
    }
    if args.docs:
        docs_text = "\n".join(
            [
                f"Measured on {_timing.describe_machine(machine)}; single-core float32 matmul {gflops:.0f} GFLOP/s,"
                f" copy bandwidth {gbs:.1f} GB/s.",
                "",
                table,
                "",
                *bar_lines,
                "",
                sweep_title,
                "",
                sweep_table,
                "",
                cross_title,
                "",
                cross_table,
            ]
        )
        update_docs(args.docs, docs_text)
    return _timing.save_result(args.out, result, *([args.docs] if args.docs else []))


if __name__ == "__main__":
    main()
