"""TRL's ``SFTTrainer`` with the δ-mem episode objective (docs/design.md §5).

Each step, for a batch of episodes (see :mod:`peft_deltamem.training.episodes`):

1. **write pass**: the write histories run through the model into a fresh :class:`~peft_deltamem.MemoryState`, with
   gradients (full backpropagation through time). No vocabulary logits are computed (``logits_to_keep`` selects no
   position). With ``write_pass_reads=False`` the layers only write, so there is no backward through the backbone.
2. **read pass**: the read contexts, as separate sequences (positions from 0, no KV cache shared), read that memory;
   the loss is the cross-entropy on the answer tokens, computed by TRL's fused LM head.
3. optionally the write-sparsity penalty ``w · (mean β over written tokens − target)²``.

Everything else (optimiser, schedules, checkpoints, ``accelerate launch``, DeepSpeed, FSDP) is ``SFTTrainer``'s own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from datasets import Dataset, IterableDataset
from jinja2 import TemplateError
from peft import PeftModel
from trl import SFTConfig, SFTTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import global_then_local_main_first

from ..config import DeltaMemConfig
from ..memory.state import MemoryState
from ..memory.write_pass import write_pass
from ..model import active_deltamem_adapter
from .collator import DeltaMemEpisodeCollator
from .data import INVALID_ROWS, DataError, check_conversation, report_invalid, validate_dataset
from .episodes import EPISODE_TURNS, EpisodeOptions, build_episodes


@dataclass
class DeltaMemSFTConfig(SFTConfig):
    """``SFTConfig`` plus the δ-mem episode settings. Every other field is TRL's / transformers' own.

    ``max_length`` bounds the read context; ``packing`` and ``padding_free`` are not supported (an episode is two
    sequences that must stay separate).
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["chat_template_kwargs"]

    # The published δ-mem learning rate (docs/design.md §5) instead of SFTConfig's full fine-tuning default.
    learning_rate: float = field(default=2e-4, metadata={"help": "The initial learning rate for AdamW."})
    max_write_length: int = field(
        default=8192, metadata={"help": "Write histories longer than this many tokens keep their last tokens."}
    )
    recent_messages: int = field(
        default=1, metadata={"help": "Non-system messages before the answer kept in the read context (0 = none)."}
    )
    episode_turns: Literal["final", "all"] = field(
        default="final", metadata={"help": "Train on the final assistant turn only, or on every assistant turn."}
    )
    write_sparsity_weight: float = field(
        default=0.0, metadata={"help": "Weight w of the penalty w·(mean β over written tokens − target)²."}
    )
    write_sparsity_target: float = field(default=0.05, metadata={"help": "Target mean write gate β."})
    read_pass_writes: bool = field(
        default=False, metadata={"help": "Let the read pass write too (token writes only; off in the paper)."}
    )
    write_pass_reads: bool = field(
        default=True,
        metadata={
            "help": "Let the write pass read the memory (corrections on, full BPTT). False: it only writes, which "
            "skips the backward pass through the backbone (cheaper)."
        },
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": 'Chat template arguments, e.g. {"enable_thinking": false}.'}
    )
    memory_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the memory projections W_mq, W_mk, W_mv (None: learning_rate, like the rest). "
            "The schedule scales it as it scales learning_rate."
        },
    )
    invalid_rows: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "Malformed conversations: 'raise' (one error line) or 'skip' (warn)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        kwargs = self.chat_template_kwargs
        try:
            kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
        except ValueError:
            kwargs = None  # reported below
        if not isinstance(kwargs, (dict, type(None))) or (kwargs is None and self.chat_template_kwargs):
            raise ValueError(
                "DeltaMemSFTConfig.chat_template_kwargs must be a mapping (or its JSON text), "
                f"got {self.chat_template_kwargs!r}"
            )
        self.chat_template_kwargs = dict(kwargs or {})
        self._check()

    def _check(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"DeltaMemSFTConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("max_write_length", "recent_messages"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (1 if name == "max_write_length" else 0)
            ):
                fail(name, "a positive integer" if name == "max_write_length" else "an integer >= 0")
        if self.episode_turns not in EPISODE_TURNS:
            fail("episode_turns", f"one of {list(EPISODE_TURNS)}")
        if self.invalid_rows not in INVALID_ROWS:
            fail("invalid_rows", f"one of {list(INVALID_ROWS)}")
        if not self.write_sparsity_weight >= 0:
            fail("write_sparsity_weight", "a number >= 0")
        if not 0 <= self.write_sparsity_target <= 1:
            fail("write_sparsity_target", "a number in [0, 1]")
        if self.memory_learning_rate is not None and not (
            isinstance(self.memory_learning_rate, (int, float)) and self.memory_learning_rate > 0
        ):
            fail("memory_learning_rate", "a positive number or None")
        for name in ("packing", "padding_free"):
            if getattr(self, name):
                fail(name, "False (an episode's write history and read context must stay separate sequences)")


def _deltamem_config(model: Any, peft_config: Any) -> DeltaMemConfig:
    """The δ-mem adapter configuration the trainer will train."""
    if peft_config is not None:
        if not isinstance(peft_config, DeltaMemConfig):
            raise TypeError(
                f"DeltaMemSFTTrainer trains δ-mem adapters: peft_config must be a DeltaMemConfig, "
                f"got {type(peft_config).__name__}"
            )
        return peft_config
    found = active_deltamem_adapter(model) if isinstance(model, PeftModel) else None
    if found is not None:
        return found[1]
    raise ValueError(
        "DeltaMemSFTTrainer needs a δ-mem adapter: pass peft_config=DeltaMemConfig(...) or a PeftModel whose active "
        "adapter is a δ-mem adapter."
    )


def _episode_rows(
    batch: dict[str, list], indices: list[int], *, tokenizer: Any, options: EpisodeOptions, source: str, invalid: str
) -> dict[str, list]:
    """``Dataset.map`` function: conversations -> episode rows; malformed rows raise or are skipped (per ``invalid``)."""
    keys = ["write_input_ids", "input_ids", "labels"]
    if options.segmented:
        keys.append("write_segment_ids")
    out: dict[str, list] = {key: [] for key in keys}
    for index, messages in zip(indices, batch["messages"], strict=True):
        problem = check_conversation(messages)
        if problem is None:
            try:
                episodes = build_episodes(tokenizer, messages, options)
            except (ValueError, TemplateError) as err:
                problem = f"cannot build episodes ({err})"
        if problem is not None:
            report_invalid([(f"row {index}", problem)], source, invalid)
            continue
        for episode in episodes:
            for key, value in episode.as_dict().items():
                out[key].append(value)
    return out


def _mean_write_gate(write_gates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """Mean β over every written token (or segment) of every layer, None if nothing was written."""
    total, count = None, None
    for beta, written in write_gates.values():
        mask = written.unsqueeze(-1).to(beta.dtype)
        layer_total = (beta * mask).sum()
        layer_count = mask.sum() * beta.shape[-1]
        total = layer_total if total is None else total + layer_total
        count = layer_count if count is None else count + layer_count
    if total is None or count.item() == 0:
        return None
    return total / count


#: Parameter names of the memory projections W_mq, W_mk, W_mv (layer.py's deltamem_memory_{q,k,v}).
_MEMORY_PROJECTIONS = (".deltamem_memory_q.", ".deltamem_memory_k.", ".deltamem_memory_v.")


def _is_memory_projection(name: str) -> bool:
    return any(part in name for part in _MEMORY_PROJECTIONS)


class DeltaMemSFTTrainer(SFTTrainer):
    """``SFTTrainer`` training a δ-mem adapter with the episode objective (module docstring).

    Takes the same arguments as ``SFTTrainer``; ``args`` is a :class:`DeltaMemSFTConfig` and the adapter comes from
    ``peft_config=DeltaMemConfig(...)`` (or a δ-mem ``PeftModel``). Datasets are conversational (``messages``) and are
    turned into episodes; a dataset that already has ``write_input_ids`` is taken as episodes as it is.
    """

    _tag_names = ["trl", "sft", "deltamem"]
    _name = "DeltaMem SFT"

    def __init__(
        self,
        model: Any,
        args: DeltaMemSFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: DeltaMemConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = DeltaMemSFTConfig("deltamem-sft")
        elif not isinstance(args, DeltaMemSFTConfig):
            raise TypeError(f"args must be a DeltaMemSFTConfig, got {type(args).__name__}")
        if kwargs.get("formatting_func") is not None:
            raise ValueError("formatting_func is not supported: episodes are built from the 'messages' column")
        self.adapter_config = _deltamem_config(model, peft_config)
        if args.read_pass_writes and self.adapter_config.write_roles is not None:
            raise ValueError(
                "read_pass_writes=True writes every token of the read context, but the adapter writes only the "
                f"messages of {self.adapter_config.write_roles}: turn read_pass_writes off or drop write_roles."
            )
        self.episode_options = EpisodeOptions(
            recent_messages=args.recent_messages,
            episode_turns=args.episode_turns,
            max_write_length=args.max_write_length,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            write_granularity=self.adapter_config.write_granularity,
            write_roles=self.adapter_config.write_roles,
            chat_template_kwargs=args.chat_template_kwargs,
        )
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        if data_collator is None:
            # SFTTrainer has set the tokenizer's pad token by now.
            self.data_collator = DeltaMemEpisodeCollator(self._tokenizer.pad_token_id, args.pad_to_multiple_of)

    # ----- data ----------------------------------------------------------------------------------------------------
    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: Any,
        args: DeltaMemSFTConfig,
        packing: bool,
        formatting_func: Any,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        columns = get_dataset_column_names(dataset)
        if columns is not None and "write_input_ids" in columns:
            return dataset
        source = f"{dataset_name} dataset"
        if isinstance(dataset, Dataset):
            # Checked up front so that all malformed rows are reported together.
            dataset = validate_dataset(dataset, source, args.invalid_rows)
        map_kwargs: dict[str, Any] = {
            "batched": True,
            "with_indices": True,
            "remove_columns": columns,
            "fn_kwargs": {
                "tokenizer": self._tokenizer,
                "options": self.episode_options,
                "source": source,
                "invalid": args.invalid_rows,
            },
        }
        if isinstance(dataset, Dataset):  # IterableDataset.map takes neither
            map_kwargs.update(num_proc=args.dataset_num_proc, desc=f"Building {dataset_name} episodes")
        with global_then_local_main_first():
            dataset = dataset.map(_episode_rows, **map_kwargs)
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            raise DataError(f"{source}: no episode left (every answer was truncated away by max_length?)")
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["write_input_ids", "write_segment_ids", "input_ids", "labels"]

    # ----- optimiser -----------------------------------------------------------------------------------------------
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Trainer's optimiser; with ``memory_learning_rate`` set, the memory projections get their own learning rate.

        Trainer builds its parameter groups (decay / no decay) and the optimiser class; each group is then split in
        two, the memory projections' half carrying ``lr=memory_learning_rate``. The scheduler multiplies every
        group's initial rate by the same factor, so warmup and decay apply to both rates alike.
        """
        # transformers 5.0 calls create_optimizer() with no argument, later releases pass the model: hand on
        # exactly what we were given.
        if self.args.memory_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        model = args[0] if args else kwargs.get("model")
        opt_model = self.model if model is None else model
        names = {id(p): n for n, p in opt_model.named_parameters()}
        optimizer = super().create_optimizer(*args, **kwargs)
        groups = []
        for group in optimizer.param_groups:
            memory = [p for p in group["params"] if _is_memory_projection(names.get(id(p), ""))]
            rest = [p for p in group["params"] if not _is_memory_projection(names.get(id(p), ""))]
            settings = {k: v for k, v in group.items() if k != "params"}
            if rest:
                groups.append({**settings, "params": rest})
            if memory:
                groups.append({**settings, "params": memory, "lr": self.args.memory_learning_rate})
        # Regrouped before the first step, so no optimiser state refers to the old groups.
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    # ----- loss ----------------------------------------------------------------------------------------------------
    def _write_pass(self, model: Any, inputs: dict[str, torch.Tensor], memory: MemoryState) -> None:
        """Run the write histories into ``memory`` (gradients kept), recording the write gates."""
        write_pass(
            model,
            inputs["write_input_ids"],
            inputs["write_attention_mask"],
            memory,
            segment_ids=inputs.get("write_segment_ids"),
            reads=self.args.write_pass_reads,
            record_write_gates=True,
        )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Write pass, read pass, cross-entropy on the answer tokens (+ the write-sparsity penalty)."""
        mode = "train" if self.model.training else "eval"
        args = self.args
        memory = MemoryState()
        self._write_pass(model, inputs, memory)
        write_gate = _mean_write_gate(memory.take_write_gates())
        # Message / sentence reads of a forward see the memory from its start, so read-pass writes could not change
        # the loss there; they are only done for token writes.
        read_writes = args.read_pass_writes and self.adapter_config.write_granularity == "token"
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=inputs["labels"],
            fused_lm_head=True,
            use_cache=False,
            memory=memory,
            memory_write=read_writes,
        )
        # As in SFTTrainer: num_items_in_batch counts the answer tokens of the whole (accumulated, all-rank) batch.
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if args.write_sparsity_weight > 0 and write_gate is not None:
            # A per-micro-batch mean, so it is averaged over the accumulation steps when Trainer does not divide.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            penalty = args.write_sparsity_weight * (write_gate - args.write_sparsity_target) ** 2
            loss = loss + penalty / steps
        self._record_metrics(mode, inputs, outputs, write_gate)
        return (loss, outputs) if return_outputs else loss

    def _record_metrics(self, mode: str, inputs: dict, outputs: Any, write_gate: torch.Tensor | None) -> None:
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy = gather(outputs.entropy.detach().sum()).sum()
        correct = gather(outputs.is_top1.sum()).sum()
        metrics = self._metrics[mode]
        metrics["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        gate = torch.tensor(-1.0 if write_gate is None else write_gate.item(), device=outputs.label_mask.device)
        gates = gather(gate.reshape(1))
        gates = gates[gates >= 0]
        if gates.numel():
            metrics["write_gate_mean"].append(gates.mean().item())
        if mode == "train":
            tokens = inputs["attention_mask"].sum() + inputs["write_attention_mask"].sum()
            self._total_train_tokens += gather(tokens).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model: Any, inputs: dict, prediction_loss_only: bool, ignore_keys: Any = None):
        """Evaluation loss of the episode objective (no logits: the read pass computes none)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


__all__ = ["DeltaMemSFTConfig", "DeltaMemSFTTrainer"]
