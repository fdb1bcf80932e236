"""`DeltaMemConfig`: the adapter configuration (docs/design.md §1, §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from ._registry import DELTAMEM_PEFT_TYPE
from .ops import SCAN_IMPLS

DELTA_HEADS = ("q", "k", "v", "o")
WRITE_GRANULARITIES = ("token", "message", "sentence")
STATE_UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
DELTA_HEAD_INITS = ("zero", "base_slice", "base_slice_fixed", "random")
DELTA_SCALE_GRANULARITIES = ("layer", "head")
WRITABLE_ROLES = ("user", "assistant", "tool")  # system messages are never written (docs/design.md §5)


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"DeltaMemConfig.{name} must be one of {list(allowed)}, got {value!r}")


def _check_positive(name: str, value: object, *, integer: bool = True) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"DeltaMemConfig.{name} must be {what}, got {value!r}")


@dataclass
class DeltaMemConfig(PeftConfig):
    """Configuration of a δ-mem adapter: an r×r online memory per adapted attention layer.

    Each adapted attention module keeps ``num_state_heads`` states of shape r×r, written with a gated delta rule and
    read to add ``alpha / r``-scaled low-rank corrections to the projections named in ``delta_heads``.
    The defaults are the paper's published recipe (TSW: token writes, one state head, heads q and o).
    """

    r: int = field(default=8, metadata={"help": "Memory rank: each state is r×r."})
    alpha: float = field(default=16, metadata={"help": "Corrections are scaled by alpha / r."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Attention modules to adapt (names or a regex). None finds every module that has "
            "q_proj, k_proj, v_proj and o_proj children."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt (all if None)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform (e.g. 'layers')."}
    )
    delta_heads: list[str] = field(
        default_factory=lambda: ["q", "o"], metadata={"help": "Projections that get a correction: q, k, v, o."}
    )
    num_state_heads: int = field(default=1, metadata={"help": "Independent r×r states per layer (4 = MSW)."})
    write_granularity: Literal["token", "message", "sentence"] = field(
        default="token", metadata={"help": "What one memory write covers: a token, a message or a sentence."}
    )
    write_roles: list[str] | None = field(
        default=None,
        metadata={
            "help": "Roles whose messages are written (a subset of user, assistant, tool), e.g. ['user']: the other "
            "messages, the system prompt and template-only tokens are read as context but never written. None "
            "writes every token of the history (token writes) or every non-system message (message / sentence)."
        },
    )
    rankwise_gates: bool = field(default=True, metadata={"help": "One write/keep gate per state row (else one)."})
    couple_lambda: bool = field(default=True, metadata={"help": "Keep gate λ = 1 − β instead of its own projection."})
    state_update_mode: Literal["standard", "lambda_outside", "no_lambda"] = field(
        default="standard", metadata={"help": "How keep/erase/write derive from β and λ (docs/design.md §1)."}
    )
    beta_bias_init: float = field(default=-1.5, metadata={"help": "Initial bias of the write gate β."})
    lambda_bias_init: float = field(default=1.5, metadata={"help": "Initial bias of the keep gate λ (uncoupled)."})
    normalize_qk: bool = field(default=True, metadata={"help": "Memory q/k are l2norm(tanh(·)) per state head."})
    init_delta_heads: Literal["zero", "base_slice", "base_slice_fixed", "random"] = field(
        default="base_slice_fixed", metadata={"help": "Initialisation of the correction heads W_Δ."}
    )
    base_slice_width: int = field(default=8, metadata={"help": "Columns copied by base_slice_fixed init."})
    online_gain: float = field(default=0.05, metadata={"help": "Gain of the base_slice / random delta-head init."})
    delta_o_rmsnorm: bool = field(default=False, metadata={"help": "RMS-normalise the o-correction first."})
    delta_o_rmsnorm_eps: float = field(default=1e-6, metadata={"help": "Epsilon of that RMS norm."})
    trainable_delta_scale: bool = field(
        default=False, metadata={"help": "Multiply corrections by a learned sigmoid(raw) · delta_scale_max."}
    )
    delta_scale_init: float = field(
        default=1.0, metadata={"help": "Initial value of that multiplier (0 < init < delta_scale_max)."}
    )
    delta_scale_max: float = field(default=2.0, metadata={"help": "Upper bound of that multiplier."})
    delta_scale_granularity: Literal["layer", "head"] = field(
        default="layer", metadata={"help": "One learned scale per layer or one per correction head."}
    )
    scan_impl: Literal["auto", "recurrent", "chunked"] = field(
        default="auto", metadata={"help": "Implementation of the recurrence (see peft_deltamem.ops)."}
    )
    scan_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Chunk length of the chunked recurrence; None picks the one measured fastest for the shape "
            "(peft_deltamem.ops.chunked.default_chunk_size)."
        },
    )
    # Read by PEFT's target matching; δ-mem never targets bare parameters.
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unused by δ-mem."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DELTAMEM_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.delta_heads = list(self.delta_heads)
        if isinstance(self.write_roles, (tuple, set, frozenset)):
            self.write_roles = sorted(self.write_roles)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values for any invalid setting."""
        _check_positive("r", self.r)
        _check_positive("alpha", self.alpha, integer=False)
        _check_positive("num_state_heads", self.num_state_heads)
        _check_positive("base_slice_width", self.base_slice_width)
        if self.scan_chunk_size is not None:
            _check_positive("scan_chunk_size", self.scan_chunk_size)
        _check_positive("delta_o_rmsnorm_eps", self.delta_o_rmsnorm_eps, integer=False)
        _check_positive("delta_scale_max", self.delta_scale_max, integer=False)
        if not self.delta_heads or any(h not in DELTA_HEADS for h in self.delta_heads):
            raise ValueError(
                f"DeltaMemConfig.delta_heads must be a non-empty subset of {list(DELTA_HEADS)}, got {self.delta_heads!r}"
            )
        if len(set(self.delta_heads)) != len(self.delta_heads):
            raise ValueError(f"DeltaMemConfig.delta_heads has duplicates: {self.delta_heads!r}")
        _check_choice("write_granularity", self.write_granularity, WRITE_GRANULARITIES)
        if self.write_roles is not None:
            roles = self.write_roles
            valid = isinstance(roles, list) and roles and all(isinstance(role, str) for role in roles)
            if not valid or not set(roles) <= set(WRITABLE_ROLES):
                raise ValueError(
                    f"DeltaMemConfig.write_roles must be None or a non-empty list of roles from {list(WRITABLE_ROLES)} "
                    f"(system messages are never written), got {roles!r}"
                )
            if len(set(roles)) != len(roles):
                raise ValueError(f"DeltaMemConfig.write_roles has duplicates: {roles!r}")
        _check_choice("state_update_mode", self.state_update_mode, STATE_UPDATE_MODES)
        _check_choice("init_delta_heads", self.init_delta_heads, DELTA_HEAD_INITS)
        _check_choice("delta_scale_granularity", self.delta_scale_granularity, DELTA_SCALE_GRANULARITIES)
        _check_choice("scan_impl", self.scan_impl, SCAN_IMPLS)
        for name in ("rankwise_gates", "couple_lambda", "normalize_qk", "delta_o_rmsnorm", "trainable_delta_scale"):
            _check_choice(name, getattr(self, name), (True, False))
        if self.online_gain < 0:
            raise ValueError(f"DeltaMemConfig.online_gain must be >= 0, got {self.online_gain!r}")
        if not 0 < self.delta_scale_init < self.delta_scale_max:
            raise ValueError(
                "DeltaMemConfig.delta_scale_init must lie strictly between 0 and delta_scale_max "
                f"({self.delta_scale_max}), got {self.delta_scale_init!r}"
            )

    @property
    def scale(self) -> float:
        """The correction scale ``alpha / r``."""
        return self.alpha / self.r

    @property
    def gate_width(self) -> int:
        """Gates per state head: r with rank-wise gates, else 1."""
        return self.r if self.rankwise_gates else 1
