"""Benchmark the memory recurrence: recurrent (token by token) vs chunked (chunkwise-parallel), DESIGN.md §2.

    python benchmarks/scan.py [--smoke] [--out benchmarks/results/scan.json] [--chunk-size 64] [--device cpu]

For every (T, r, N) it times the forward (under ``torch.no_grad``, the prefill path) and the forward+backward
(gradients of a fixed random linear function of the reads and the final state w.r.t. q, k, v, the three gates and
the initial state: the training path) of both implementations, and reports median times, the speedup
(recurrent / chunked) and, beside them, the max abs difference between the two in reads, final state and every
gradient. Inputs look like the layer's: q, k = l2norm(tanh(·)), β = sigmoid(· − 1.5) rank-wise, keep = 1 − β
(standard mode, coupled λ), a random initial state.

The recurrent forward+backward at T = 8192 takes tens of seconds per call on a CPU, so it is timed with no warm-up
and a single repeat (``--slow-repeats``); the table's "repeats" column says what each time is a median of.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # run from a checkout without installing: `python benchmarks/scan.py`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import _timing  # noqa: E402

from peft_deltamem.ops import delta_rule_scan  # noqa: E402

FULL = {"T": (512, 2048, 8192), "r": (8, 16), "N": (1, 4), "chunk_sweep": (16, 32, 64, 128)}
SMOKE = {"T": (40, 130), "r": (4,), "N": (1, 2), "chunk_sweep": (8, 64)}
IMPLS = ("recurrent", "chunked")
GRAD_NAMES = ("q", "k", "v", "keep", "erase", "write", "state")

SHAPE_COLUMNS = {"T": "T", "r": "r", "N": "N"}
COLUMNS = {
    **SHAPE_COLUMNS,
    "fwd_recurrent_ms": "fwd rec ms",
    "fwd_chunked_ms": "fwd chunk ms",
    "fwd_speedup": "fwd ×",
    "fwdbwd_recurrent_ms": "fwd+bwd rec ms",
    "fwdbwd_chunked_ms": "fwd+bwd chunk ms",
    "fwdbwd_speedup": "fwd+bwd ×",
    "repeats": "repeats rec/chunk (fwd; fwd+bwd)",
    "max_diff_reads": "max|Δ| reads",
    "max_diff_state": "max|Δ| state",
    "max_diff_grads": "max|Δ| grads",
    "chunked_fwdbwd_peak_mb": "chunk fwd+bwd peak MB",
}
SWEEP_COLUMNS = {
    **SHAPE_COLUMNS,
    "chunk_size": "chunk size",
    "fwd_chunked_ms": "fwd ms",
    "fwdbwd_chunked_ms": "fwd+bwd ms",
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


def _weights(n: int, t: int, r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, t, r, generator=gen).to(device), torch.randn(n, r, r, generator=gen).to(device)


def run_case(
    n: int, t: int, r: int, *, chunk_size: int, device: torch.device, repeats: int, slow_repeats: int, slow_t: int
) -> dict[str, Any]:
    """Time both implementations on one shape and compare their outputs and gradients."""
    leaves = make_inputs(n, t, r, device)
    w_reads, w_state = _weights(n, t, r, device)

    def forward(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
        return delta_rule_scan(*leaves, impl=impl, chunk_size=chunk_size)

    def forward_backward(impl: str) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        reads, final = forward(impl)
        loss = (reads * w_reads).sum() + (final * w_state).sum()
        return reads, final, torch.autograd.grad(loss, leaves)

    row: dict[str, Any] = {"T": t, "r": r, "N": n}
    reps = []
    last: dict[str, Any] = {}  # the last forward+backward result of each impl, for the accuracy columns
    for mode in ("fwd", "fwdbwd"):
        for impl in IMPLS:
            slow = impl == "recurrent" and mode == "fwdbwd" and t >= slow_t
            warmup, rep = (0, slow_repeats) if slow else (1, repeats)

            def call(impl: str = impl, mode: str = mode) -> None:
                if mode == "fwd":
                    with torch.no_grad():
                        forward(impl)
                else:
                    last[impl] = forward_backward(impl)

            timing = _timing.time_fn(call, warmup=warmup, repeats=rep, device=device)
            row[f"{mode}_{impl}_ms"] = timing["median_s"] * 1e3
            row[f"{mode}_{impl}_times_s"] = timing["times_s"]
            reps.append(str(rep))
        row[f"{mode}_speedup"] = row[f"{mode}_recurrent_ms"] / row[f"{mode}_chunked_ms"]
    row["repeats"] = f"{reps[0]}/{reps[1]}; {reps[2]}/{reps[3]}"

    (rec_reads, rec_final, rec_grads), (chk_reads, chk_final, chk_grads) = last["recurrent"], last["chunked"]
    row["max_diff_reads"] = (rec_reads - chk_reads).abs().max().item()
    row["max_diff_state"] = (rec_final - chk_final).abs().max().item()
    grad_diffs = {name: (a - b).abs().max().item() for name, a, b in zip(GRAD_NAMES, rec_grads, chk_grads, strict=True)}
    row["max_diff_grads"] = max(grad_diffs.values())
    row["max_diff_grad_by_input"] = grad_diffs
    last.clear()
    peak = _timing.peak_memory(lambda: forward_backward("chunked"), device=device)
    row["chunked_fwdbwd_peak_mb"] = peak["peak_bytes"] / 2**20
    row["peak_method"] = peak["method"]
    return row


def chunk_sweep(
    n: int, t: int, r: int, sizes: Sequence[int], *, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """Chunked form only: forward and forward+backward time against the chunk size, on one shape."""
    leaves = make_inputs(n, t, r, device)
    w_reads, w_state = _weights(n, t, r, device)
    rows = []
    for size in sizes:

        def fwd(size: int = size) -> None:
            with torch.no_grad():
                delta_rule_scan(*leaves, impl="chunked", chunk_size=size)

        def fwd_bwd(size: int = size) -> None:
            reads, final = delta_rule_scan(*leaves, impl="chunked", chunk_size=size)
            torch.autograd.grad((reads * w_reads).sum() + (final * w_state).sum(), leaves)

        row = {"T": t, "r": r, "N": n, "chunk_size": size}
        for mode, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
            row[f"{mode}_chunked_ms"] = _timing.time_fn(fn, repeats=repeats, device=device)["median_s"] * 1e3
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the markdown table, write the JSON; returns the JSON object."""
    parser = _timing.benchmark_parser(__doc__, "scan")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk size of the chunked form")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; smoke 1)")
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats for recurrent fwd+bwd at T >= --slow-t")
    parser.add_argument("--slow-t", type=int, default=8192, help="from this T on, recurrent fwd+bwd is 'slow'")
    args = _timing.parse_args(parser, argv)
    device = torch.device(args.device)
    grid = SMOKE if args.smoke else FULL
    repeats = args.repeats or (1 if args.smoke else 5)

    machine = _timing.start_report("scan benchmark", args.smoke, device)
    rows = []
    for t in grid["T"]:
        for r in grid["r"]:
            for n in grid["N"]:
                row = run_case(
                    n,
                    t,
                    r,
                    chunk_size=args.chunk_size,
                    device=device,
                    repeats=repeats,
                    slow_repeats=args.slow_repeats,
                    slow_t=args.slow_t,
                )
                rows.append(row)
                print(
                    f"T={t} r={r} N={n}: fwd+bwd {row['fwdbwd_recurrent_ms']:.0f} ms vs {row['fwdbwd_chunked_ms']:.1f}"
                    f" ms ({row['fwdbwd_speedup']:.0f}×), max diff {row['max_diff_grads']:.1e}",
                    flush=True,
                )
    sweep_shapes = [(1, max(grid["T"]), min(grid["r"])), (max(grid["N"]), max(grid["T"]), max(grid["r"]))]
    sweep = [
        row
        for shape in dict.fromkeys(sweep_shapes)
        for row in chunk_sweep(*shape, grid["chunk_sweep"], device=device, repeats=min(repeats, 3))
    ]
    notes = [
        "Times are medians of 'repeats' timed calls (recurrent/chunked; forward; forward+backward), after 1 warm-up"
        " call, wall clock.",
        f"Recurrent forward+backward at T >= {args.slow_t}: no warm-up, {args.slow_repeats} repeat(s) (slow).",
        "fwd = forward under torch.no_grad; fwd+bwd = forward + torch.autograd.grad w.r.t. q, k, v, keep, erase,"
        " write and the initial state.",
        "× = recurrent time / chunked time. max|Δ| = max abs difference recurrent vs chunked (grads: over all inputs).",
        f"Peak MB: {rows[0]['peak_method'] if rows else ''} growth during one chunked forward+backward.",
        f"chunk_size = {args.chunk_size}; gates [N, T, r] (rank-wise), standard mode, keep = 1 - beta; float32.",
    ]
    sweep_title = "Chunked form against the chunk size (median of up to 3 repeats):"
    _timing.print_report(rows, COLUMNS, notes, [sweep_title, "", _timing.markdown_table(sweep, SWEEP_COLUMNS), ""])
    result = {
        "benchmark": "scan",
        "smoke": args.smoke,
        "machine": machine,
        "settings": {
            "chunk_size": args.chunk_size,
            "repeats": repeats,
            "slow_repeats": args.slow_repeats,
            "slow_t": args.slow_t,
            "grid": grid,
            "device": str(device),
        },
        "notes": notes,
        "rows": rows,
        "chunk_sweep": sweep,
    }
    return _timing.save_result(args.out, result)


if __name__ == "__main__":
    main()
