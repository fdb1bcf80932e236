"""The fused decode step: one C++ call for a δ-mem layer's memory step on one token (docs/benchmarks.md, "Decode").

Decoding one token runs the memory step of every adapted layer on vectors of r floats: some forty operator calls per
layer, each costing more than its arithmetic. :func:`decode_step` does the same arithmetic (the projections, q/k
normalisation, the gates, the read and the write of docs/design.md §1, and the correction heads) in one call of a
small C++ extension, built with :mod:`torch.utils.cpp_extension` the first time it is enabled (about a minute; cached
after).

It is opt-in: :func:`enable_fused_decode` (or ``DELTAMEM_FUSED_DECODE=1`` in the environment) builds it, raising a
clear error if it cannot be built (no C++ compiler); the layer then takes it for every one-token call without
gradients that reads, or reads and writes the token (:mod:`peft_deltamem.fused_decoding`), and the eager path for
everything else. Its results match the eager path to
float32 round-off (tests/ops/test_fused.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["decode_step", "enable_fused_decode", "fused_decode_enabled", "disable_fused_decode"]

ENV_FLAG = "DELTAMEM_FUSED_DECODE"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_step.cpp"
# The state-update modes in the order of the C++ enum.
MODES = ("standard", "lambda_outside", "no_lambda")

_extension: ModuleType | None = None
_enabled = False
_environment_read = False


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    global _extension
    if _extension is None:
        try:
            _extension = load(name="peft_deltamem_decode_step", sources=[str(_SOURCE)], extra_cflags=["-O3"])
        except Exception as error:  # a missing compiler or headers: say what to do, not only what failed
            raise RuntimeError(
                f"peft_deltamem: could not build the fused decode step ({_SOURCE.name}): {error}. It needs a C++ "
                f"compiler (g++ or clang++) and the Python headers; without them, leave it off ({ENV_FLAG} unset): "
                "the eager path computes the same."
            ) from error
    return _extension


def enable_fused_decode() -> None:
    """Build (first time: about a minute, then cached by torch) and switch on the fused decode step."""
    global _enabled
    _build()
    _enabled = True


def disable_fused_decode() -> None:
    """Back to the eager decode step."""
    global _enabled
    _enabled = False


def fused_decode_enabled() -> bool:
    """Whether one-token decode steps take the fused path (switched on here or by ``DELTAMEM_FUSED_DECODE=1``)."""
    global _environment_read
    if not _environment_read:  # once: this runs for every layer and token
        _environment_read = True
        if os.environ.get(ENV_FLAG, "") not in ("", "0"):
            enable_fused_decode()  # the environment asks for it: build it or fail loudly, never fall back silently
    return _enabled


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
    return (_extension or _build()).decode_step(
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
