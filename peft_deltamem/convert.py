"""Import (and export) adapters in the reference implementation's format (DESIGN.md §6).

The paper's released adapters are a directory with ``delta_mem_config.json`` (a dump of the upstream config dataclass)
and ``delta_mem_adapter.pt`` (a pickled flat dict of bf16 tensors keyed ``model.layers.{i}.self_attn.{name}``).
:func:`convert_reference_adapter` turns one into a normal PEFT adapter directory of this package
(``adapter_config.json`` + ``adapter_model.safetensors``) whose model computes what the reference computes;
:func:`export_reference_adapter` goes the other way, so adapters trained here run in the paper's code.

Safety: the pickle is read with ``torch.load(weights_only=True)`` only, and anything in it that is not a tensor is
refused. Every check runs before anything is written, and the output directory appears complete or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ._io import atomic_path
from .config import DELTA_HEADS, DeltaMemConfig

logger = logging.getLogger(__name__)

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
    """The reference config dict for one of this package's configs (fields the reference reads, defaults elsewhere)."""
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


# ------------------------------------------------------------------------------------------------ base geometry
@dataclass
class BaseGeometry:
    """What a base model offers δ-mem: its attention modules by layer index and their projections' weight shapes."""

    attention: dict[int, str]  # layer index -> attention module name, e.g. "model.layers.3.self_attn"
    projection_shapes: dict[int, dict[str, tuple[int, int]]]  # layer -> head -> (out_features, in_features)
    num_layers: int
    num_parameters: int = 0
    model_type: str | None = None
    notes: list[str] = field(default_factory=list)


def base_geometry(base_model_name_or_path: str | os.PathLike, **config_kwargs: Any) -> BaseGeometry:
    """Read a base model's config and build the model on the meta device (no weights) to learn its geometry.

    ``AutoConfig.from_pretrained`` accepts a local directory or a Hub id; only ``config.json`` is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .layer import find_projections

    try:
        config = AutoConfig.from_pretrained(str(base_model_name_or_path), **config_kwargs)
    except Exception as exc:
        raise ReferenceFormatError(f"cannot read the base model config of {base_model_name_or_path!r}: {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    attention: dict[int, str] = {}
    shapes: dict[int, dict[str, tuple[int, int]]] = {}
    for name, module in model.named_modules():
        projections = find_projections(module)
        match = re.search(r"(?:^|\.)(\d+)\.[^.]+$", name)
        if projections is None or match is None:
            continue
        layer = int(match.group(1))
        if layer in attention:  # one attention module per decoder layer is what δ-mem adapts
            raise ReferenceFormatError(f"base model has two attention modules for layer {layer}: cannot map by index")
        attention[layer] = name
        shapes[layer] = {head: tuple(p.weight.shape) for head, p in projections.items()}
    if not attention:
        raise ReferenceFormatError(f"{base_model_name_or_path!r} has no attention modules with q/k/v/o projections.")
    return BaseGeometry(
        attention=attention,
        projection_shapes=shapes,
        num_layers=len(attention),
        num_parameters=sum(p.numel() for p in model.parameters()),
        model_type=getattr(config, "model_type", None),
    )


# ------------------------------------------------------------------------------------------------ tensor mapping
def _expected_shapes(
    config: DeltaMemConfig, hidden: int, outputs: Mapping[str, int] | None
) -> dict[str, tuple[int, ...] | None]:
    """Shape of every reference tensor one layer must have (None: output size unknown without the base model)."""
    d, gates = config.num_state_heads * config.r, config.num_state_heads * config.gate_width
    shapes: dict[str, tuple[int, ...] | None] = {
        "memory_q_proj": (d, hidden),
        "memory_k_proj": (d, hidden),
        "memory_v_proj": (d, hidden),
        "beta_proj": (gates, hidden),
        "beta_bias": (gates,),
    }
    if not config.couple_lambda:
        shapes.update(lambda_proj=(gates, hidden), lambda_bias=(gates,))
    for head in config.delta_heads:
        shapes[f"delta_{head}_proj"] = (outputs[head], d) if outputs else None
    if config.delta_o_rmsnorm and "o" in config.delta_heads:
        shapes["delta_o_rmsnorm_weight"] = (outputs["o"],) if outputs else None
    if config.trainable_delta_scale:
        shapes["delta_scale_raw"] = (len(DELTA_HEADS),) if config.delta_scale_granularity == "head" else (1,)
    return shapes


def _group_by_layer(tensors: Mapping[str, torch.Tensor]) -> dict[int, tuple[str, dict[str, torch.Tensor]]]:
    layers: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY_PATTERN.match(key)
        if match is None or match.group("name") not in TENSOR_NAMES:
            raise ReferenceFormatError(
                f"unexpected tensor {key!r} in the reference adapter: expected keys "
                f"'model.layers.<i>.self_attn.<name>' with <name> one of {sorted(TENSOR_NAMES)}."
            )
        layer, module = int(match.group("layer")), match.group("module")
        if layer in layers and layers[layer][0] != module:
            raise ReferenceFormatError(
                f"layer {layer} appears under two module names: {layers[layer][0]!r}, {module!r}"
            )
        layers.setdefault(layer, (module, {}))[1][match.group("name")] = tensor
    if not layers:
        raise ReferenceFormatError("the reference adapter holds no tensors.")
    return layers


def state_dict_from_reference(
    tensors: Mapping[str, torch.Tensor], config: DeltaMemConfig, geometry: BaseGeometry | None = None
) -> dict[str, torch.Tensor]:
    """Check every reference tensor's shape and map it onto this package's saved-adapter key (float32, contiguous).

    Tensors the reference keeps but never uses (correction heads not in ``delta_heads``, which upstream stores as
    zeros; a keep gate with coupled λ; an o-norm or learned scale that is switched off) are dropped with a log note.
    """
    layers = _group_by_layer(tensors)
    wanted_layers = set(config.layers_to_transform) if config.layers_to_transform else None
    if geometry is not None:
        wanted_layers = wanted_layers or set(geometry.attention)
        outside = sorted(set(layers) - set(geometry.attention))
        if outside:
            raise ReferenceFormatError(
                f"the reference adapter has layers {outside} but the base model has {geometry.num_layers} "
                f"(indices 0-{geometry.num_layers - 1}): it was trained for another model."
            )
    if wanted_layers is not None and set(layers) != wanted_layers:
        raise ReferenceFormatError(
            f"the reference adapter holds layers {sorted(layers)} but targets {sorted(wanted_layers)} "
            "(target_layers; [] means every layer of the base model)."
        )

    # Without the base model, the hidden size is what the memory projections say, and it must be the same everywhere.
    hidden_sizes = {parts["memory_q_proj"].shape[-1] for _, parts in layers.values() if "memory_q_proj" in parts}
    if geometry is None and len(hidden_sizes) != 1:
        raise ReferenceFormatError(f"memory_q_proj has different (or no) input sizes across layers: {hidden_sizes}")
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    dropped: set[str] = set()
    for layer, (module, parts) in sorted(layers.items()):
        if geometry is not None:
            shapes_here = geometry.projection_shapes[layer]
            hidden = shapes_here["q"][1]
            outputs = {head: shape[0] for head, shape in shapes_here.items()}
            module = geometry.attention[layer]  # the base model's own name for this layer's attention
        else:
            hidden = next(iter(hidden_sizes))
            outputs = None
        expected = _expected_shapes(config, hidden, outputs)
        for name in expected.keys() - parts.keys():
            problems.append(f"layer {layer}: missing {name}")
        for name, tensor in parts.items():
            if name not in expected:
                dropped.add(name)
                continue
            shape = expected[name]
            actual = tuple(tensor.shape)
            if name == "delta_scale_raw" and tensor.numel() == 1 and shape == (1,):
                actual = (1,)  # a 0-d scalar is the same single scale
            if shape is None:  # output size unknown: only the d columns can be checked
                ok = tensor.dim() == (2 if name.endswith("_proj") else 1) and (
                    not name.endswith("_proj") or actual[1] == config.num_state_heads * config.r
                )
                shape_text = "[out, n·r]" if name.endswith("_proj") else "[out]"
            else:
                ok, shape_text = actual == shape, str(list(shape))
            if not ok:
                problems.append(f"{module}.{name}: shape {list(tensor.shape)}, expected {shape_text}")
                continue
            out[f"{PEFT_KEY_PREFIX}{module}.{TENSOR_NAMES[name]}"] = (
                tensor.detach().reshape(actual).float().contiguous()
            )
        if outputs is None:
            # Without the base model the correction heads must at least agree with one another within the layer.
            sizes = {
                n: parts[n].shape[0] for n in ("delta_o_proj", "delta_o_rmsnorm_weight") if n in expected and n in parts
            }
            if len(set(sizes.values())) > 1:
                problems.append(
                    f"{module}: delta_o_proj and delta_o_rmsnorm_weight disagree on the output size {sizes}"
                )
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        where = "the base model" if geometry is not None else "the reference config"
        raise ReferenceFormatError(
            f"the reference adapter does not fit {where}: "
            + "; ".join(problems[:8])
            + more
            + f". Settings: r={config.r}, num_state_heads={config.num_state_heads}, "
            f"rankwise_gates={config.rankwise_gates}, delta_heads={config.delta_heads}."
        )
    if dropped:
        logger.info("dropping reference tensors that the configuration does not use: %s", sorted(dropped))
    return out


# ---------------------------------------------------------------------------------------------------- conversion
def convert_reference_adapter(
    src: str | os.PathLike,
    out: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    write_card: bool = True,
) -> Path:
    """Convert a reference-format δ-mem adapter into a PEFT adapter directory of this package.

    Args:
        src: a directory with ``delta_mem_config.json`` and ``delta_mem_adapter.pt``, or a Hub repo id holding them
            (downloaded with ``huggingface_hub``; ``revision`` and ``token`` apply).
        out: the adapter directory to write (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``).
            It appears complete or not at all; an existing directory is replaced only on success.
        base_model_name_or_path: the base model the adapter was trained on. When given, its config (only the
            config) is read, every tensor's shape is checked against its projections, layer indices are mapped
            onto its attention modules by name, and it is recorded in ``adapter_config.json``.
        write_card: also write a model card (``README.md``) describing the adapter.

    Returns the output directory. Loading it: ``PeftModel.from_pretrained(base_model, out)``.

    Raises:
        ReferenceFormatError: unreadable, truncated or unsafe files, unsupported settings, or shapes that do not fit.
    """
    config_path, weights_path = _resolve_source(src, revision, token)
    reference = read_reference_config(config_path)
    config = config_from_reference(reference, base_model_name_or_path=base_model_name_or_path)
    tensors = read_reference_weights(weights_path)
    geometry = base_geometry(base_model_name_or_path) if base_model_name_or_path is not None else None
    state_dict = state_dict_from_reference(tensors, config, geometry)
    attention_names = sorted(
        {key[len(PEFT_KEY_PREFIX) :].split(".deltamem_")[0].rsplit(".", 1)[-1] for key in state_dict}
    )
    # Target the attention modules by their leaf name (as upstream's target_modules does), so PEFT adapts exactly the
    # modules whose weights are in the file, never some other module that happens to have q/k/v/o children.
    config.target_modules = set(attention_names)
    if geometry is None and config.layers_to_transform is None:
        logger.info("target_layers is [] and no base model was given: the adapter will adapt every layer it finds")

    with atomic_path(out, directory=True) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state_dict, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        if write_card:
            from .hub import write_model_card

            write_model_card(
                tmp,
                base_num_parameters=geometry.num_parameters if geometry else None,
                num_layers=geometry.num_layers if geometry else None,
                source=str(src),
            )
    return Path(out)


# ------------------------------------------------------------------------------------------------------- export
def export_reference_adapter(
    adapter: Any, out: str | os.PathLike, *, adapter_name: str = "default", dtype: torch.dtype = torch.float32
) -> Path:
    """Write an adapter of this package in the reference format (``delta_mem_config.json`` + ``delta_mem_adapter.pt``).

    Args:
        adapter: a ``PeftModel`` with a δ-mem adapter, or a saved adapter directory.
        out: the directory to write (atomically).
        dtype: tensor dtype in the pickle (the released adapters use ``torch.bfloat16``).

    Correction heads not in ``delta_heads`` are written as zeros when their shapes are known (from the model, or from
    the base model's config when the directory names a local one), since upstream modules always hold all four.
    """
    config, state_dict, outputs = _adapter_parts(adapter, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, set[str]] = {}
    for key, tensor in state_dict.items():
        body = key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key
        module, _, ours = body.partition(".deltamem_")
        ours = "deltamem_" + ours
        if ours not in _PEFT_TO_REFERENCE:
            raise ReferenceFormatError(f"unexpected adapter tensor {key!r}")
        tensors[f"{module}.{_PEFT_TO_REFERENCE[ours]}"] = tensor.detach().to("cpu", dtype).contiguous()
        modules.setdefault(module, set()).add(_PEFT_TO_REFERENCE[ours])
    d = config.num_state_heads * config.r
    for module in modules:
        layer = int(_KEY_PATTERN.match(f"{module}.x").group("layer"))
        for head in DELTA_HEADS:
            name = f"delta_{head}_proj"
            if head not in config.delta_heads and outputs and layer in outputs:
                tensors[f"{module}.{name}"] = torch.zeros(outputs[layer][head], d, dtype=dtype)
    attention_names = sorted({module.rsplit(".", 1)[-1] for module in modules})
    reference = config_to_reference(config, target_modules=attention_names)
    with atomic_path(out, directory=True) as tmp:
        (tmp / REFERENCE_CONFIG_NAME).write_text(json.dumps(reference, indent=2) + "\n")
        torch.save(tensors, tmp / REFERENCE_WEIGHTS_NAME)
    return Path(out)


def _adapter_parts(
    adapter: Any, adapter_name: str
) -> tuple[DeltaMemConfig, dict[str, torch.Tensor], dict[int, dict[str, int]] | None]:
    """(config, saved-format state dict, per-layer projection output sizes or None) of a model or directory."""
    if isinstance(adapter, (str, os.PathLike)):
        from safetensors.torch import load_file

        directory = Path(adapter)
        config = DeltaMemConfig.from_pretrained(str(directory))
        state_dict = load_file(str(directory / PEFT_WEIGHTS_NAME))
        outputs = None
        base = config.base_model_name_or_path
        if base and Path(base).is_dir():
            geometry = base_geometry(base)
            outputs = {i: {h: s[0] for h, s in shapes.items()} for i, shapes in geometry.projection_shapes.items()}
        return config, state_dict, outputs
    from peft.utils import get_peft_model_state_dict

    from .layer import DeltaMemAttention, find_projections

    config = adapter.peft_config[adapter_name]
    if not isinstance(config, DeltaMemConfig):
        raise ReferenceFormatError(f"adapter {adapter_name!r} is not a δ-mem adapter ({type(config).__name__})")
    state_dict = get_peft_model_state_dict(adapter, adapter_name=adapter_name)
    outputs = {}
    for name, module in adapter.named_modules():
        if isinstance(module, DeltaMemAttention):
            match = re.search(r"(?:^|\.)(\d+)\.[^.]+$", name)
            if match:
                projections = find_projections(module.base_layer)
                outputs[int(match.group(1))] = {h: p.weight.shape[0] for h, p in projections.items()}
    return config, state_dict, outputs
