"""Opt-in C++ for the two places where operator overhead dominates (docs/benchmarks.md): the decode step and the
chunked scan's per-row solves.

Decoding one token runs the memory step of every adapted layer on vectors of r floats: some forty operator calls per
layer, each costing more than its arithmetic. :func:`decode_step` does the same arithmetic (the projections, q/k
normalisation, the gates, the read and the write of docs/design.md §1, and the correction heads) in one call.
With rank-wise gates the chunked scan has one small triangular system per state row and chunk; :func:`row_solve`
solves them by substitution instead of forming N·r C×C matrices for a batched solver.

Each is a small extension built with :mod:`torch.utils.cpp_extension` the first time it is enabled (about a minute;
cached after), and opt-in: :func:`enable_fused_decode` / :func:`enable_fused_scan` (or ``DELTAMEM_FUSED_DECODE=1`` /
``DELTAMEM_FUSED_SCAN=1`` in the environment) build it, raising a clear error if it cannot be built (no C++
compiler). The layer then takes the decode step for every one-token call without gradients that reads, or reads and
writes the token (:mod:`peft_deltamem.fused_decoding`), and the chunked scan the solve in its factored form; the eager
path does everything else. Results match the eager path to float32 round-off (tests/ops/test_fused.py,
tests/ops/test_fused_scan.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "decode_step",
    "disable_fused_decode",
    "disable_fused_scan",
    "enable_fused_decode",
    "enable_fused_scan",
    "fused_decode_enabled",
    "fused_scan_enabled",
    "row_solve",
]

_CSRC = Path(__file__).resolve().parent / "csrc"
# The state-update modes in the order of the C++ enum.
MODES = ("standard", "lambda_outside", "no_lambda")


class _NativeOp:
    """One opt-in C++ extension: built on first use, switched on in code or by its environment variable (read once:
    callers ask for every layer and token), never a silent fallback when asked for and not buildable."""

    def __init__(self, name: str, source: str, flag: str, what: str) -> None:
        self.name, self.source, self.flag, self.what = name, _CSRC / source, flag, what
        self.extension: ModuleType | None = None
        self.enabled = False
        self.environment_read = False

    def build(self) -> ModuleType:
        from torch.utils.cpp_extension import load

        if self.extension is None:
            try:
                self.extension = load(name=self.name, sources=[str(self.source)], extra_cflags=["-O3"])
            except Exception as error:  # a missing compiler or headers: say what to do, not only what failed
                raise RuntimeError(
                    f"peft_deltamem: could not build {self.what} ({self.source.name}): {error}. It needs a C++ "
                    f"compiler (g++ or clang++) and the Python headers; without them, leave it off ({self.flag} "
                    "unset): the eager path computes the same."
                ) from error
        return self.extension

    def enable(self) -> None:
        self.build()
        self.enabled = True

    def is_enabled(self) -> bool:
        if not self.environment_read:
            self.environment_read = True
            if os.environ.get(self.flag, "") not in ("", "0"):
                self.enable()  # the environment asks for it: build it or fail loudly, never fall back silently
        return self.enabled


_DECODE = _NativeOp("peft_deltamem_decode_step", "decode_step.cpp", "DELTAMEM_FUSED_DECODE", "the fused decode step")
_SCAN = _NativeOp("peft_deltamem_row_solve", "row_solve.cpp", "DELTAMEM_FUSED_SCAN", "the fused scan solve")
ENV_FLAG = _DECODE.flag
SCAN_ENV_FLAG = _SCAN.flag


def enable_fused_decode() -> None:
    """Build (first time: about a minute, then cached by torch) and switch on the fused decode step."""
    _DECODE.enable()


def disable_fused_decode() -> None:
    """Back to the eager decode step."""
    _DECODE.enabled = False


def fused_decode_enabled() -> bool:
    """Whether one-token decode steps take the fused path (switched on here or by ``DELTAMEM_FUSED_DECODE=1``)."""
    return _DECODE.is_enabled()


def enable_fused_scan() -> None:
    """Build (first time: about a minute, then cached by torch) and switch on the chunked scan's fused per-row solve
    (:func:`row_solve`)."""
    _SCAN.enable()


def disable_fused_scan() -> None:
    """Back to the chunked scan's eager solves."""
    _SCAN.enabled = False


def fused_scan_enabled() -> bool:
    """Whether the chunked scan solves its per-row systems in C++ (switched on here or by ``DELTAMEM_FUSED_SCAN=1``)."""
    return _SCAN.is_enabled()


def row_solve(
    gram: torch.Tensor, p_out: torch.Tensor, erase_p: torch.Tensor, rhs: torch.Tensor, transpose: bool
) -> torch.Tensor | None:
    """The chunked scan's per-row systems (peft_deltamem/ops/chunked.py, the factored form) without forming them:
    ``x`` [N, C, R] (token-major: a column per state row i) with ``(diag(p_out) + diag(erase_p) tril₋₁(gram)) x = rhs``
    for every chunk n and row i, or the transposed system with ``transpose``; ``gram`` [N, C, C] is K Kᵀ, the others
    [N, C, R] or broadcastable to it (a row-shared gate [N, C, 1]).
    None if some tensor is not float32 on the CPU (the caller then solves eagerly); no autograd."""
    return (_SCAN.extension or _SCAN.build()).row_solve(gram, p_out, erase_p, rhs, transpose)  # undefined: None


def decode_step(
    x: torch.Tensor,
    in_weights: list[torch.Tensor],
    gate_bias: torch.Tensor,
    state: torch.Tensor,
    valid: torch.Tensor | None,
    write: bool,
    delta_weights: list[torch.Tensor],
    scale: float,
    heads: int,
    r: int,
    normalize_qk: bool,
    couple_lambda: bool,
    mode: int,
    gate_width: int,
) -> list[torch.Tensor]:
    """One token through a layer's memory and correction heads: ``x`` [B, 1, H] float32, ``in_weights`` the input
    projections' weights in stacking order (q, k, v, write gate[, keep gate]), ``gate_bias`` their biases
    concatenated, ``state`` [B, n, r, r], ``valid`` [B, 1] bool or None, ``write`` whether the token is written (else
    it is only read), ``delta_weights`` the heads' W_Δ applied with ``scale``; ``mode`` indexes :data:`MODES`,
    ``gate_width`` is g (r with rank-wise gates, else 1). Returns ``[reads [B, n·r], next state [B, n, r, r] (the
    state itself if not writing), β [B·n, 1, g], then each head's correction [B, 1, out]]``,
    or an empty list if some tensor is not float32 on the CPU (the caller then takes the eager path); no autograd."""
    return (_DECODE.extension or _DECODE.build()).decode_step(
        x,
        in_weights,
        gate_bias,
        state,
        valid,
        write,
        delta_weights,
        scale,
        heads,
        r,
        normalize_qk,
        couple_lambda,
        mode,
        gate_width,
    )
