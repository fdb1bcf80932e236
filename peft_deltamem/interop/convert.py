"""Import (and export) adapters in the reference implementation's format (docs/design.md §6).

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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from .._io import atomic_path
from ..config import DELTA_HEADS, DeltaMemConfig
from ..layer import DeltaMemAttention, find_projections
from .hub import write_model_card
from .reference_format import (
    _KEY_PATTERN,
    _PEFT_TO_REFERENCE,
    GRANULARITY_FROM_REFERENCE,
    GRANULARITY_TO_REFERENCE,
    PEFT_CONFIG_NAME,
    PEFT_KEY_PREFIX,
    PEFT_WEIGHTS_NAME,
    REFERENCE_CONFIG_NAME,
    REFERENCE_WEIGHTS_NAME,
    TENSOR_NAMES,
    ReferenceConfigWarning,
    ReferenceFormatError,
    _resolve_source,
    config_from_reference,
    config_to_reference,
    read_reference_config,
    read_reference_weights,
)

__all__ = [
    "BaseGeometry",
    "GRANULARITY_FROM_REFERENCE",
    "GRANULARITY_TO_REFERENCE",
    "PEFT_CONFIG_NAME",
    "PEFT_KEY_PREFIX",
    "PEFT_WEIGHTS_NAME",
    "REFERENCE_CONFIG_NAME",
    "REFERENCE_WEIGHTS_NAME",
    "ReferenceConfigWarning",
    "ReferenceFormatError",
    "TENSOR_NAMES",
    "base_geometry",
    "config_from_reference",
    "config_to_reference",
    "convert_reference_adapter",
    "export_reference_adapter",
    "read_reference_config",
    "read_reference_weights",
    "state_dict_from_reference",
]

logger = logging.getLogger(__name__)


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
        directory = Path(adapter)
        config = DeltaMemConfig.from_pretrained(str(directory))
        state_dict = load_file(str(directory / PEFT_WEIGHTS_NAME))
        outputs = None
        base = config.base_model_name_or_path
        if base and Path(base).is_dir():
            geometry = base_geometry(base)
            outputs = {i: {h: s[0] for h, s in shapes.items()} for i, shapes in geometry.projection_shapes.items()}
        return config, state_dict, outputs
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
