"""The reference implementation's adapter format: its files, its config fields and tensor names (read side).

A released adapter is a directory with ``delta_mem_config.json`` (a dump of the upstream config dataclass) and
``delta_mem_adapter.pt`` (a pickled flat dict of bf16 tensors keyed ``model.layers.{i}.self_attn.{name}``). This module
reads both safely and maps the config to and from :class:`~peft_deltamem.DeltaMemConfig`;
:mod:`peft_deltamem.interop.convert` maps the tensors and writes adapter directories.

Safety: the pickle is read with ``torch.load(weights_only=True)`` only, and anything in it that is not a tensor is
refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import DeltaMemConfig

REFERENCE_CONFIG_NAME = "delta_mem_config.json"
REFERENCE_WEIGHTS_NAME = "delta_mem_adapter.pt"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModelForCausalLM saves adapter weights under this prefix, followed by the module's name in the base model.
PEFT_KEY_PREFIX = "base_model.model."

# Reference tensor name -> this package's parameter name (relative to the attention module).
TENSOR_NAMES: dict[str, str] = {
    "memory_q_proj": "deltamem_memory_q.weight",
    "memory_k_proj": "deltamem_memory_k.weight",
    "memory_v_proj": "deltamem_memory_v.weight",
    "beta_proj": "deltamem_write_gate.weight",
    "beta_bias": "deltamem_write_gate.bias",
    "lambda_proj": "deltamem_keep_gate.weight",
    "lambda_bias": "deltamem_keep_gate.bias",
    "delta_q_proj": "deltamem_delta_q.weight",
    "delta_k_proj": "deltamem_delta_k.weight",
    "delta_v_proj": "deltamem_delta_v.weight",
    "delta_o_proj": "deltamem_delta_o.weight",
    "delta_o_rmsnorm_weight": "deltamem_delta_o_norm",
    "delta_scale_raw": "deltamem_delta_scale",
}
_PEFT_TO_REFERENCE = {ours: theirs for theirs, ours in TENSOR_NAMES.items()}

GRANULARITY_FROM_REFERENCE = {"token": "token", "message_mean": "message", "sentence_mean": "sentence"}
GRANULARITY_TO_REFERENCE = {ours: theirs for theirs, ours in GRANULARITY_FROM_REFERENCE.items()}

# Reference config fields that change what the model computes; a reference dump always has them.
_REQUIRED_FIELDS = (
    "rank",
    "alpha",
    "num_state_heads",
    "delta_heads",
    "memory_write_granularity",
    "normalize_qk",
    "couple_lambda",
    "state_update_mode",
    "rankwise_gates",
)
# Reference field -> (our field, default when absent). Renamed fields are mapped, the rest keep their names.
_OPTIONAL_FIELDS: dict[str, tuple[str, Any]] = {
    "beta_bias_init": ("beta_bias_init", -1.5),
    "output_init": ("init_delta_heads", "zero"),
    "base_slice_ref_width": ("base_slice_width", 8),
    "online_gain": ("online_gain", 0.05),
    "delta_o_rmsnorm": ("delta_o_rmsnorm", False),
    "delta_o_rmsnorm_eps": ("delta_o_rmsnorm_eps", 1e-6),
    "trainable_delta_scale": ("trainable_delta_scale", False),
    "delta_scale_init": ("delta_scale_init", 1.0),
    "delta_scale_max": ("delta_scale_max", 2.0),
    "delta_scale_granularity": ("delta_scale_granularity", "layer"),
}
# Upstream settings this package does not implement: any value other than the one given changes the computation, so
# it is refused. (Most are archived experiments that upstream itself refuses; checking them here gives a clear message
# instead of a silently different model.)
_REQUIRED_VALUES: dict[str, Any] = {
    "memory_readout_mode": "delta",
    "memory_write_source": "learned_hidden",
    "delta_scale_parameterization": "alpha_over_rank",
    "num_memory_partitions": 1,
    "num_global_memory_partitions": 0,
    "tie_memory_partition_read_write": False,
    "slot_read_top_k": 0,
    "global_memory_read_top_k": 0,
}
_MUST_BE_EMPTY = ("memory_reader_layers", "latent_memory_layers")
_STRUCTURAL_FIELDS = ("target_layers", "target_modules")

# Reference keys: "<attention module>.<tensor>", the module's name ending in ".<layer index>.<attention name>".
_KEY_PATTERN = re.compile(r"^(?P<module>(?:.+\.)?(?P<layer>\d+)\.(?P<attn>[A-Za-z_]\w*))\.(?P<name>\w+)$")


class ReferenceFormatError(ValueError):
    """The reference adapter cannot be converted: unreadable, unsafe, unsupported or not fitting the base model."""


class ReferenceConfigWarning(UserWarning):
    """A note about the reference config that does not stop the conversion (e.g. ignored fields)."""


# ---------------------------------------------------------------------------------------------------------- reading
def _resolve_source(src: str | os.PathLike, revision: str | None, token: str | bool | None) -> tuple[Path, Path]:
    """Local paths of the reference config and weights: ``src`` is a directory, or a Hub repo id to download from."""
    path = Path(src)
    if path.is_dir():
        config, weights = path / REFERENCE_CONFIG_NAME, path / REFERENCE_WEIGHTS_NAME
        missing = [p.name for p in (config, weights) if not p.is_file()]
        if missing:
            raise ReferenceFormatError(
                f"{path} is not a reference δ-mem adapter directory: missing {', '.join(missing)} "
                f"(expected {REFERENCE_CONFIG_NAME} and {REFERENCE_WEIGHTS_NAME})."
            )
        return config, weights
    if path.exists():
        raise ReferenceFormatError(f"{path} is a file; pass the directory that holds {REFERENCE_CONFIG_NAME}.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        raise ReferenceFormatError(f"{src!r} is neither an existing directory nor a Hub repo id (owner/name).")
    from huggingface_hub import hf_hub_download

    downloaded = [
        Path(hf_hub_download(str(src), name, revision=revision, token=token))
        for name in (REFERENCE_CONFIG_NAME, REFERENCE_WEIGHTS_NAME)
    ]
    return downloaded[0], downloaded[1]


def read_reference_config(path: str | os.PathLike) -> dict[str, Any]:
    """The reference config as a dict (the JSON file as written by upstream)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ReferenceFormatError(f"cannot read the reference config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ReferenceFormatError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def read_reference_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The reference tensors, loaded with ``torch.load(weights_only=True)`` and checked to be a flat dict of tensors.

    Raises :class:`ReferenceFormatError` for a truncated or corrupt file, a pickle that needs anything beyond
    PyTorch's safe allow-list, or content that is not ``{str: floating-point tensor}``.
    """
    path = Path(path)
    try:
        # weights_only=True: the unpickler only rebuilds tensors and plain containers, never arbitrary objects.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise ReferenceFormatError(
                f"refusing {path}: the pickle contains objects other than tensors, which are not loaded for safety "
                f"(torch.load(weights_only=True) rejected it: {str(exc).splitlines()[0]})"
            ) from exc
        raise ReferenceFormatError(f"{path} is truncated or corrupt: {exc}") from exc
    except Exception as exc:  # zipfile, EOF and storage errors all mean "not a complete torch file"
        raise ReferenceFormatError(
            f"{path} is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(data, Mapping):
        raise ReferenceFormatError(f"refusing {path}: expected a flat dict of tensors, got {type(data).__name__}.")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in data.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ReferenceFormatError(
            f"refusing {path}: every entry must be a tensor keyed by name; not tensors: {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        )
    not_float = [k for k, v in data.items() if not v.is_floating_point()]
    if not_float:
        raise ReferenceFormatError(f"refusing {path}: tensors must be floating point; not: {not_float[:5]}")
    return dict(data)


# ------------------------------------------------------------------------------------------------ config mapping
def config_from_reference(
    reference: Mapping[str, Any], *, base_model_name_or_path: str | None = None, warn_unknown: bool = True
) -> DeltaMemConfig:
    """Map a reference config dict onto a :class:`DeltaMemConfig`; refuse settings this package does not implement.

    Unknown keys (the upstream dataclass has many unused fields) are ignored with a warning that names them.
    """
    missing = [name for name in _REQUIRED_FIELDS if name not in reference]
    if missing:
        raise ReferenceFormatError(f"the reference config lacks required fields: {missing}")
    for name, wanted in _REQUIRED_VALUES.items():
        if name in reference and reference[name] != wanted:
            raise ReferenceFormatError(
                f"unsupported reference setting {name}={reference[name]!r}: peft_deltamem implements only "
                f"{name}={wanted!r} (the paper's δ-mem: delta-rule memory read out as q/k/v/o corrections)."
            )
    for name in _MUST_BE_EMPTY:
        if reference.get(name):
            raise ReferenceFormatError(f"unsupported reference setting {name}={reference[name]!r}: must be empty.")
    granularity = reference["memory_write_granularity"]
    if granularity not in GRANULARITY_FROM_REFERENCE:
        raise ReferenceFormatError(
            f"unsupported memory_write_granularity {granularity!r}: supported are {list(GRANULARITY_FROM_REFERENCE)}."
        )
    known = set(_REQUIRED_FIELDS) | set(_OPTIONAL_FIELDS) | set(_REQUIRED_VALUES) | set(_MUST_BE_EMPTY)
    unknown = sorted(set(reference) - known - set(_STRUCTURAL_FIELDS))
    if unknown and warn_unknown:
        warnings.warn(
            f"ignoring {len(unknown)} reference config field(s) that do not affect the converted adapter: "
            f"{', '.join(unknown)}",
            ReferenceConfigWarning,
            stacklevel=3,
        )

    heads = reference["delta_heads"]
    heads = [h.strip() for h in heads.split(",")] if isinstance(heads, str) else [str(h) for h in heads]
    heads = list(dict.fromkeys(h.lower() for h in heads if h))  # upstream lower-cases and de-duplicates
    target_layers = reference.get("target_layers") or []
    kwargs: dict[str, Any] = {
        ours: reference.get(theirs, default) for theirs, (ours, default) in _OPTIONAL_FIELDS.items()
    }
    try:
        return DeltaMemConfig(
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
            inference_mode=True,
            r=int(reference["rank"]),
            alpha=float(reference["alpha"]),
            num_state_heads=int(reference["num_state_heads"]),
            delta_heads=heads,
            write_granularity=GRANULARITY_FROM_REFERENCE[granularity],
            normalize_qk=bool(reference["normalize_qk"]),
            couple_lambda=bool(reference["couple_lambda"]),
            state_update_mode=str(reference["state_update_mode"]).strip().lower(),
            rankwise_gates=bool(reference["rankwise_gates"]),
            # Upstream initialises the uncoupled keep-gate bias at −beta_bias_init (init only: the weights are loaded).
            lambda_bias_init=-float(kwargs["beta_bias_init"]),
            layers_to_transform=sorted(int(i) for i in target_layers) or None,
            **kwargs,
        )
    except ValueError as exc:
        raise ReferenceFormatError(f"the reference config maps onto an invalid DeltaMemConfig: {exc}") from exc


def config_to_reference(config: DeltaMemConfig, *, target_modules: list[str]) -> dict[str, Any]:
    """The reference config dict for one of this package's configs (fields the reference reads, defaults elsewhere).

    Raises ``ReferenceFormatError`` for a setting the reference format cannot express (``write_roles``).
    """
    if config.write_roles is not None:
        raise ReferenceFormatError(
            f"the adapter writes only {config.write_roles} messages (write_roles), which the reference format cannot "
            "express: its code would write every token. Keep the adapter in this package's format."
        )
    return {
        "rank": config.r,
        "alpha": float(config.alpha),
        "beta_bias_init": config.beta_bias_init,
        "normalize_qk": config.normalize_qk,
        "couple_lambda": config.couple_lambda,
        "state_update_mode": config.state_update_mode,
        "rankwise_gates": config.rankwise_gates,
        "output_init": config.init_delta_heads,
        "base_slice_ref_width": config.base_slice_width,
        "online_gain": config.online_gain,
        "num_state_heads": config.num_state_heads,
        "memory_readout_mode": "delta",
        "memory_write_source": "learned_hidden",
        "memory_write_granularity": GRANULARITY_TO_REFERENCE[config.write_granularity],
        "target_modules": list(target_modules),
        "target_layers": list(config.layers_to_transform or []),
        "delta_heads": list(config.delta_heads),
        "delta_o_rmsnorm": config.delta_o_rmsnorm,
        "delta_o_rmsnorm_eps": config.delta_o_rmsnorm_eps,
        "trainable_delta_scale": config.trainable_delta_scale,
        "delta_scale_init": config.delta_scale_init,
        "delta_scale_max": config.delta_scale_max,
        "delta_scale_granularity": config.delta_scale_granularity,
    }
