"""Training δ-mem adapters with TRL: the episode objective on ``SFTTrainer`` (DESIGN.md §5).

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

from .collator import DeltaMemEpisodeCollator
from .data import DataError, check_conversation, load_conversations, validate_dataset
from .episodes import Episode, EpisodeOptions, build_episodes, split_episode
from .trainer import DeltaMemSFTConfig, DeltaMemSFTTrainer

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
