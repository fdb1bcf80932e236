"""Training δ-mem adapters with TRL: the episode objective on ``SFTTrainer`` (docs/design.md §5).

Needs the ``train`` extra (``trl``, ``datasets``, ``accelerate``)::

    from peft_deltamem import DeltaMemConfig
    from peft_deltamem.training import DeltaMemSFTConfig, DeltaMemSFTTrainer

    trainer = DeltaMemSFTTrainer(
        model="Qwen/Qwen3-4B-Instruct-2507",
        args=DeltaMemSFTConfig(output_dir="out", recent_messages=1),
        train_dataset=load_conversations("train.jsonl"),  # from peft_deltamem.training
        peft_config=DeltaMemConfig(task_type="CAUSAL_LM"),
    )
    trainer.train()
"""

import importlib
from typing import Any

from .collator import DeltaMemEpisodeCollator
from .episodes import Episode, EpisodeOptions, build_episodes, split_episode

# What needs the ``train`` extra is imported on first use, so the episode encoding (shared with the evaluation) works
# without trl and datasets.
_LAZY = {
    "DataError": "data",
    "check_conversation": "data",
    "load_conversations": "data",
    "validate_dataset": "data",
    "DeltaMemSFTConfig": "trainer",
    "DeltaMemSFTTrainer": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataError",
    "DeltaMemEpisodeCollator",
    "DeltaMemSFTConfig",
    "DeltaMemSFTTrainer",
    "Episode",
    "EpisodeOptions",
    "build_episodes",
    "check_conversation",
    "load_conversations",
    "split_episode",
    "validate_dataset",
]
