"""Sharing δ-mem adapters on the Hugging Face Hub: a real model card, and a push helper that writes it.

``PeftModel.save_pretrained`` writes PEFT's generic card template, and ``PeftModel.push_to_hub`` (transformers'
``PushToHubMixin``) replaces it with transformers' generic card, for LoRA as for δ-mem. To share a δ-mem adapter with a
card that says what it is, use::

    from peft_deltamem.interop.hub import push_adapter_to_hub
    push_adapter_to_hub(model, "user/my-deltamem-adapter", results="results.json")

or, for a directory you upload yourself, ``write_model_card(model, "adapter-dir")`` after ``save_pretrained``.
Loading is the usual ``PeftModel.from_pretrained(base, "user/my-deltamem-adapter")``.

The card's metadata carries ``base_model``, ``library_name: peft``, ``pipeline_tag: text-generation`` and the tags
``deltamem``, ``peft`` and the write strategy (``tsw``, ``ssw`` or ``msw``); its text describes the configuration in
words (rank, corrected projections, layers, state heads, parameter count and share of the base model), shows how to
load the adapter and chat with it, and lists evaluation results when given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
import yaml  # a dependency of huggingface_hub
from huggingface_hub import HfApi, ModelCard
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from .._version import __version__
from ..config import DeltaMemConfig

CARD_NAME = "README.md"
PAPER_URL = "https://arxiv.org/abs/2605.12357"
_LAYER_IN_KEY = re.compile(r"(?:^|\.)(\d+)\.[^.]+\.deltamem_")


# --------------------------------------------------------------------------------------------------- summary
@dataclass
class AdapterSummary:
    """The facts a model card states about one δ-mem adapter."""

    config: DeltaMemConfig
    layers: list[int]  # indices of the adapted layers
    num_parameters: int  # parameters of the adapter
    base_model: str | None = None
    num_layers: int | None = None  # layers of the base model, when known
    base_num_parameters: int | None = None  # parameters of the base model, when known

    @property
    def strategy(self) -> str:
        """The paper's name for the write strategy: TSW (token), MSW (token, several state heads), SSW (segments)."""
        if self.config.write_granularity != "token":
            return "SSW"
        return "MSW" if self.config.num_state_heads > 1 else "TSW"


def write_strategy(config: DeltaMemConfig) -> tuple[str, str]:
    """(tag, description) of a config's write strategy, e.g. ``("tsw", "token-level writes ...")``."""
    heads = config.num_state_heads
    head_text = f"{heads} independent state heads" if heads > 1 else "one state head"
    roles = "" if config.write_roles is None else f"; only {'/'.join(config.write_roles)} messages are written"
    if config.write_granularity == "token":
        name = "MSW" if heads > 1 else "TSW"
        what = "every token is written" if config.write_roles is None else "every token of a written message"
        return name.lower(), f"{name}: {what}, with {head_text}{roles}"
    unit = "message" if config.write_granularity == "message" else "sentence"
    return "ssw", f"SSW: one write per {unit} (the mean of its hidden states), with {head_text}{roles}"


def summarize_model(model: Any, adapter_name: str | None = None) -> AdapterSummary:
    """Summarise the δ-mem adapter of a ``PeftModel`` (the active one by default)."""
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    if not isinstance(config, DeltaMemConfig):
        raise TypeError(f"adapter {adapter_name!r} is not a δ-mem adapter ({type(config).__name__})")
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    base = model.get_base_model()
    base_params = sum(p.numel() for name, p in base.named_parameters() if "deltamem_" not in name)
    base_config = getattr(base, "config", None)
    return AdapterSummary(
        config=config,
        layers=_layers(state_dict),
        num_parameters=sum(t.numel() for t in state_dict.values()),
        base_model=config.base_model_name_or_path or getattr(base_config, "_name_or_path", None) or None,
        num_layers=getattr(base_config, "num_hidden_layers", None),
        base_num_parameters=base_params,
    )


def summarize_directory(
    directory: str | os.PathLike,
    *,
    base_num_parameters: int | None = None,
    num_layers: int | None = None,
) -> AdapterSummary:
    """Summarise a saved δ-mem adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    directory = Path(directory)
    config = DeltaMemConfig.from_pretrained(str(directory))
    keys_and_sizes: dict[str, int] = {}
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            size = 1
            for dim in shape:
                size *= dim
            keys_and_sizes[key] = size
    return AdapterSummary(
        config=config,
        layers=_layers(keys_and_sizes),
        num_parameters=sum(keys_and_sizes.values()),
        base_model=config.base_model_name_or_path,
        num_layers=num_layers,
        base_num_parameters=base_num_parameters,
    )


def _layers(keys: Mapping[str, Any]) -> list[int]:
    return sorted({int(m.group(1)) for key in keys if (m := _LAYER_IN_KEY.search(key))})


# ------------------------------------------------------------------------------------------------------ card
def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


def _layers_text(summary: AdapterSummary) -> str:
    count = len(summary.layers)
    if summary.num_layers is not None and count == summary.num_layers:
        return f"all {count} decoder layers"
    of = f" of {summary.num_layers}" if summary.num_layers is not None else ""
    return f"{count}{of} decoder layers ({_ranges(summary.layers)})"


def _configuration_lines(summary: AdapterSummary) -> list[str]:
    config = summary.config
    _, strategy = write_strategy(config)
    gates = "one gate per state row" if config.rankwise_gates else "one gate per state head"
    keep = "λ = 1 − β (coupled)" if config.couple_lambda else "its own keep gate λ"
    params = f"{summary.num_parameters:,}"
    if summary.base_num_parameters:
        share = 100.0 * summary.num_parameters / summary.base_num_parameters
        params += f" ({share:.3g} % of the base model's {summary.base_num_parameters:,})"
    lines = [
        f"- **Write strategy:** {strategy}.",
        f"- **Memory:** rank r = {config.r}, so each state head is an {config.r}×{config.r} matrix; "
        f"{config.num_state_heads} state head{'s' if config.num_state_heads > 1 else ''} per layer.",
        f"- **Corrected projections:** {', '.join(f'{h}_proj' for h in config.delta_heads)}, scaled by "
        f"alpha / r = {config.alpha:g} / {config.r} = {config.scale:g}.",
        f"- **Adapted layers:** {_layers_text(summary)}.",
        f"- **Gates:** write gate β ({gates}), {keep}; state update mode `{config.state_update_mode}`; "
        f"memory q/k {'L2-normalised' if config.normalize_qk else 'not normalised'}.",
        f"- **Trainable parameters:** {params}.",
    ]
    extras = []
    if config.delta_o_rmsnorm and "o" in config.delta_heads:
        extras.append("the o-correction is RMS-normalised")
    if config.trainable_delta_scale:
        extras.append(
            f"a learned correction scale per {config.delta_scale_granularity} (at most {config.delta_scale_max:g})"
        )
    if extras:
        lines.append(f"- **Also:** {'; '.join(extras)}.")
    return lines


def _usage(summary: AdapterSummary, repo_id: str) -> str:
    base = summary.base_model or "<base model>"
    write_call = "model(**history, memory=memory)  # writes the conversation into the memory"
    config = summary.config
    if config.write_granularity != "token" or config.write_roles is not None:
        # Token writes of some roles take message ids: -1 marks the tokens read as context, not written.
        granularity = "message" if config.write_granularity == "token" else config.write_granularity
        roles = "" if config.write_roles is None else f", write_roles={config.write_roles!r}"
        write_call = (
            "from peft_deltamem.chat.segments import segment_ids_for\n"
            f'ids, segments = segment_ids_for(tokenizer, chat, "{granularity}"{roles})\n'
            "model(input_ids=torch.tensor([ids]), memory=memory, memory_segment_ids=torch.tensor([segments]))"
        )
    return f"""```python
import torch
import peft_deltamem  # registers the δ-mem PEFT method
from peft import PeftModel
from peft_deltamem import MemoryState
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{base}")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{repo_id}")

memory = MemoryState()  # one memory per conversation
chat = [{{"role": "user", "content": "My locker code is 417."}}, {{"role": "assistant", "content": "Noted!"}}]
history = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
{write_call}

# Ask without the history in the prompt: the answer comes from the memory.
question = [{{"role": "user", "content": "What is my locker code?"}}]
inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, memory=memory, max_new_tokens=32)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def _flatten(results: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(results, Mapping):
        rows = []
        for key, value in results.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(results, list) and all(not isinstance(v, (Mapping, list)) for v in results):
        return [(prefix, ", ".join(_format_value(v) for v in results))]
    if isinstance(results, list):
        rows = []
        for i, value in enumerate(results):
            rows += _flatten(value, f"{prefix}[{i}]")
        return rows
    return [(prefix, results)]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _results_section(results: Mapping[str, Any] | list) -> str:
    rows = _flatten(results)
    table = ["| result | value |", "|---|---|"]
    table += [f"| {name.replace('|', '/')} | {_format_value(value).replace('|', '/')} |" for name, value in rows]
    return "## Evaluation results\n\n" + "\n".join(table)


def _load_results(results: str | os.PathLike | Mapping[str, Any] | list | None) -> Any:
    if results is None or isinstance(results, (Mapping, list)):
        return results
    try:
        return json.loads(Path(results).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the evaluation results JSON {results}: {exc}") from exc


def render_model_card(
    summary: AdapterSummary,
    *,
    repo_id: str | None = None,
    results: str | os.PathLike | Mapping[str, Any] | list | None = None,
    existing_metadata: Mapping[str, Any] | None = None,
    source: str | None = None,
):
    """The model card (a ``huggingface_hub.ModelCard``) for an adapter summary.

    ``existing_metadata`` (e.g. what PEFT's ``save_pretrained`` wrote) is kept, with ``library_name``, ``base_model``
    and ``pipeline_tag`` set and the δ-mem tags added to its tags. ``results`` is a JSON file or an already parsed
    object; every leaf value becomes a row of the evaluation table.
    """
    config = summary.config
    metadata: dict[str, Any] = dict(existing_metadata or {})
    tag, _ = write_strategy(config)
    tags = [t for t in (metadata.get("tags") or []) if t and not str(t).endswith("adapter:")]
    if summary.base_model:
        tags.append(f"base_model:adapter:{summary.base_model}")
    tags += ["deltamem", "peft", tag, "memory"]
    metadata["tags"] = list(dict.fromkeys(tags))
    metadata["library_name"] = "peft"
    metadata["pipeline_tag"] = "text-generation"
    if summary.base_model:
        metadata["base_model"] = summary.base_model
    else:
        metadata.pop("base_model", None)  # PEFT writes '' when it does not know; an empty base_model is invalid

    title_base = f" for {summary.base_model}" if summary.base_model else ""
    origin = f"\n\nConverted from the reference implementation's format (source: `{source}`)." if source else ""
    sections = [
        "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---",
        f"# δ-mem adapter{title_base}",
        f"A [δ-mem]({PAPER_URL}) adapter: it gives the frozen base model a small online memory. Every adapted "
        "attention layer keeps r×r state matrices that are written with a gated delta rule as the conversation "
        "streams through, and read to add low-rank corrections to the layer's projections. A conversation's history "
        f"can then leave the prompt and still inform the answers. Made with peft-deltamem {__version__} "
        f"(a PEFT method: `import peft_deltamem`, then the usual PEFT API).{origin}",
        "## Adapter configuration\n\n" + "\n".join(_configuration_lines(summary)),
        "## How to use\n\n" + _usage(summary, repo_id or "<this repo>"),
    ]
    parsed = _load_results(results)
    if parsed:
        sections.append(_results_section(parsed))
    sections.append(_versions())
    return ModelCard("\n\n".join(sections) + "\n")


def _versions() -> str:
    return (
        "### Framework versions\n\n"
        f"- PEFT {peft.__version__}\n- peft-deltamem {__version__}\n"
        f"- Transformers {transformers.__version__}\n- PyTorch {torch.__version__}"
    )


def write_model_card(
    model_or_dir: Any,
    save_directory: str | os.PathLike | None = None,
    *,
    results: str | os.PathLike | Mapping[str, Any] | list | None = None,
    repo_id: str | None = None,
    adapter_name: str | None = None,
    base_num_parameters: int | None = None,
    num_layers: int | None = None,
    source: str | None = None,
) -> Path:
    """Write the δ-mem model card as ``README.md`` and return its path.

    Args:
        model_or_dir: a ``PeftModel`` with a δ-mem adapter (then ``save_directory`` says where to write), or a saved
            adapter directory (the card is written into it).
        results: evaluation results, a JSON file or a parsed object, rendered as a table.
        repo_id: the Hub repo the card will live in (used in the usage example).
        base_num_parameters: parameter count of the base model, for a directory (a model knows it).
        num_layers: number of decoder layers of the base model, for a directory (a model knows it).
        source: where a converted adapter came from, mentioned in the text.

    Metadata already in ``README.md`` (e.g. from PEFT's ``save_pretrained``) is kept and completed; its text is
    replaced by the δ-mem card.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir if save_directory is None else save_directory)
        summary = summarize_directory(model_or_dir, base_num_parameters=base_num_parameters, num_layers=num_layers)
    else:
        if save_directory is None:
            raise ValueError("write_model_card(model, save_directory): say where to write the card for a model")
        directory = Path(save_directory)
        summary = summarize_model(model_or_dir, adapter_name)
    path = directory / CARD_NAME
    existing = ModelCard.load(path).data.to_dict() if path.is_file() else None
    card = render_model_card(summary, repo_id=repo_id, results=results, existing_metadata=existing, source=source)
    directory.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


# ------------------------------------------------------------------------------------------------------ push
def push_adapter_to_hub(
    model_or_dir: Any,
    repo_id: str,
    *,
    results: str | os.PathLike | Mapping[str, Any] | list | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload δ-mem adapter",
    adapter_name: str | None = None,
):
    """Upload a δ-mem adapter with its model card to the Hub and return the ``CommitInfo``.

    ``model_or_dir`` is a ``PeftModel`` (saved with ``save_pretrained`` into a temporary directory) or an adapter
    directory (copied, so the card is added without touching it). The repo is created if needed. Load it back with
    ``PeftModel.from_pretrained(base, repo_id)``. As with PEFT's own ``save_pretrained``, an adapter not named
    ``"default"`` is stored in a subfolder named after it (load with ``subfolder=adapter_name``).
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deltamem-push-") as tmp:
        work = Path(tmp) / "adapter"
        if isinstance(model_or_dir, (str, os.PathLike)):
            shutil.copytree(model_or_dir, work)
            write_model_card(work, results=results, repo_id=repo_id)
        else:
            selected = [adapter_name] if adapter_name else None
            model_or_dir.save_pretrained(str(work), selected_adapters=selected)
            write_model_card(model_or_dir, work, results=results, repo_id=repo_id, adapter_name=adapter_name)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(work),
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
