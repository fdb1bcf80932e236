"""`DeltaMemModel`: the PEFT tuner that wraps attention modules with `DeltaMemAttention` (docs/design.md §4)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from peft.tuners.tuners_utils import BaseTuner

from ._registry import DELTAMEM_PEFT_TYPE
from .layer import PROJECTIONS, DeltaMemAttention, find_projections
from .memory.checkpointing import restore_checkpointing
from .memory.generation import generate_with_memory
from .memory.hooks import active_layers, install_memory_hooks, remove_memory_hooks

if TYPE_CHECKING:
    from torch import nn

    from .config import DeltaMemConfig
    from .memory.state import MemoryState


class DeltaMemModel(BaseTuner):
    """Adds δ-mem to a transformers decoder. Created by ``peft.get_peft_model(model, DeltaMemConfig(...))``.

    Each targeted attention module is wrapped in a :class:`~peft_deltamem.layer.DeltaMemAttention`; a hook on the base
    model carries the ``memory=`` argument of each call to those layers (see :mod:`peft_deltamem.memory.hooks`).

    Besides the base model's own arguments, a forward call of the ``PeftModel`` accepts:

    * ``memory``: a :class:`~peft_deltamem.memory.state.MemoryState`, read and advanced in place by the call's writes.
      Without it the call starts from an empty memory and keeps nothing.
    * ``memory_write`` (default ``True``): ``False`` makes the call read-only; the memory is left unchanged.
    * ``memory_read`` (default ``True``): ``False`` makes a write-only call: the layers write but add no corrections.
    * ``memory_segment_ids``: ``[batch, tokens]`` message or sentence ids (``-1`` = not written) for ``message`` /
      ``sentence`` adapters; without them the call's tokens are written as one segment. A ``token`` adapter writes
      every token whose id is not ``-1`` and reads, without writing, those whose id is (``write_roles``).
    * ``memory_record_write_gates`` (default ``False``): keep the write gates β of the call in
      ``memory.last_write_gates`` (with their graph), e.g. for a sparsity penalty.

    Padding (a 2-D ``attention_mask``) is never written. ``merge_and_unload()`` raises: the corrections come from the
    memory at run time, not from a weight delta; ``unload()`` returns the untouched base model.
    """

    prefix: str = "deltamem_"
    tuner_layer_cls = DeltaMemAttention
    # Attention modules are found structurally (see _pre_injection_hook), so no per-architecture table is needed.
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: DeltaMemConfig, model_config: dict) -> DeltaMemConfig:
        # Runs for every adapter, the first and those added later with add_adapter / load_adapter (PEFT calls
        # _pre_injection_hook for the first adapter only).
        if peft_config.target_modules is None:
            model = self.model
            # An attention module already wrapped by an earlier adapter is found by its wrapper's name.
            wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, DeltaMemAttention)}
            names = {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, DeltaMemAttention) or (id(module) not in wrapped and find_projections(module))
            }
            if not names:
                raise ValueError(
                    f"δ-mem found no attention module in {type(model).__name__}: it looks for modules with children "
                    f"{list(PROJECTIONS.values())}. Set DeltaMemConfig.target_modules to the attention modules' names."
                )
            peft_config.target_modules = names
        return peft_config

    def _post_injection_hook(self, model: nn.Module, config: DeltaMemConfig, adapter_name: str) -> None:
        self._hand_layers_to_memory_hooks(model)

    def inject_adapter(self, model: nn.Module, *args, **kwargs) -> None:
        # Also reached by add_adapter / load_adapter, which do not run _post_injection_hook: a new adapter may wrap
        # more modules, so the memory hooks get the new layer list.
        super().inject_adapter(model, *args, **kwargs)
        self._hand_layers_to_memory_hooks(model)

    @staticmethod
    def _hand_layers_to_memory_hooks(model: nn.Module) -> None:
        install_memory_hooks(model, [m for m in model.modules() if isinstance(m, DeltaMemAttention)])

    def _create_and_replace(
        self,
        peft_config: DeltaMemConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if isinstance(target, DeltaMemAttention):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = DeltaMemAttention(target, adapter_name, peft_config, memory_key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Refuse PEFT's mixed-adapter batches (``adapter_names=[...]``, one adapter per batch row), by design.

        PEFT runs this around every forward and ``generate`` call while an adapter is enabled. δ-mem cannot mix
        adapters in one batch: each adapter has its own memory layout, a ``MemoryState`` belongs to one adapter, and
        the memory's rows must all be read and written by it. A list that names only the active adapter for every
        row is the ordinary single-adapter call and runs as such; anything else raises instead of being ignored.
        """
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is not None:
            active = self.active_adapters
            if not (len(active) == 1 and all(name == active[0] for name in adapter_names)):
                raise ValueError(
                    f"δ-mem does not support mixed-adapter batches (adapter_names={list(adapter_names)!r}; active "
                    f"adapter {active[0] if len(active) == 1 else active!r}): every adapter has its own memory, and "
                    "a MemoryState belongs to one adapter. Split the batch by adapter and run each part after "
                    "model.set_adapter(name), with that adapter's MemoryState (rows for the base model: inside "
                    "`with model.disable_adapter():`)."
                )
        yield

    def generate(self, *args, memory: MemoryState | None = None, memory_write: bool = True, **kwargs):
        """The base model's ``generate``, with the memory carried through decoding (greedy, sampling, beam search).

        Args:
            *args: passed to ``generate`` (usually ``input_ids`` and ``attention_mask`` as keywords).
            memory: the memory to read; afterwards it holds the prompt and the generated tokens, each written once
                (tokens after a sequence's end are not written). With beam search or several return sequences it
                has one row per returned sequence. Without it, a temporary empty memory is used.
            memory_write: ``False`` only reads ``memory`` and leaves it unchanged.
            **kwargs: passed to ``generate``.

        Returns:
            What ``generate`` returns. The memory is advanced only if generation succeeds.
        """
        if not active_layers(self.model):
            # Adapters disabled (disable_adapter()): the base model generates and the memory is untouched, as in
            # a forward call.
            return self.model.generate(*args, **kwargs)
        return generate_with_memory(self.model, *args, memory=memory, memory_write=memory_write, **kwargs)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Used by unload(): the attention module goes back as it was; it has no single weight to re-tie.
        setattr(parent, child_name, new_module)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "δ-mem adapters cannot be merged: the corrections come from an online memory, not a weight delta. "
            "Use unload() to get the base model back, or keep the PeftModel."
        )

    def merge_adapter(self, *args, **kwargs) -> None:
        """Not supported: δ-mem corrections come from the memory at run time, so there is no weight delta to merge.

        Raises:
            ValueError: always.
        """
        self._check_merge_allowed()

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs):
        if merge:
            self._check_merge_allowed()
        remove_memory_hooks(self.model)
        restore_checkpointing(self.model)
        return super()._unload_and_optionally_merge(merge=False, **kwargs)


def active_deltamem_adapter(model: Any) -> tuple[str, DeltaMemConfig] | None:
    """``(name, config)`` of the model's active adapter if it is a δ-mem adapter, else None.

    None for a model that is not a ``PeftModel``, has several active adapters, or whose active adapter is of another
    PEFT type. The one lookup of "the active δ-mem config" that sessions, training and evaluation share.
    """
    name = getattr(model, "active_adapter", None)
    configs = getattr(model, "peft_config", None)
    if not isinstance(name, str) or not isinstance(configs, Mapping):
        return None
    config = configs.get(name)
    return (name, config) if getattr(config, "peft_type", None) == DELTAMEM_PEFT_TYPE else None
