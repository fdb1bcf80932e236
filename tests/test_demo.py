"""``deltamem demo`` end to end on a tiny random model (seconds): the curriculum, the files and results.json's schema.

The real SmolLM2 run is tests/test_demo_real_model.py; here ``load_base_model`` returns a tiny Llama with SmolLM2's
chat template, and training stops after a few steps, so only the plumbing is under test, not recall.
"""

from __future__ import annotations

import json

import pytest
from chat_fixtures import smollm2_tokenizer
from tiny_models import tiny_model_for

import peft_deltamem.models
from peft_deltamem.demo import check_targets, main
from peft_deltamem.training.timed import curriculum_stages

SYSTEMS = ("no_history", "full_history", "bm25", "deltamem", "deltamem_empty_memory", "deltamem_other_memory")


def test_curriculum_stages_add_one_level_per_stage_with_equal_time() -> None:
    assert curriculum_stages([1, 2, 4], 9.0) == [([1], 3.0), ([1, 2], 3.0), ([1, 2, 4], 3.0)]
    assert curriculum_stages([1, 2], 8.0, curriculum=False) == [([1, 2], 8.0)]
    assert curriculum_stages([3], 5.0) == [([3], 5.0)]


def test_check_targets_reads_the_issue_s_four_conditions() -> None:
    def system(accuracy: float, ci: tuple[float, float] = (0.0, 0.0)) -> dict:
        return {"accuracy": accuracy, "accuracy_ci": list(ci)}

    systems = {
        "no_history": system(0.10, (0.02, 0.20)),
        "full_history": system(0.60),
        "deltamem": system(0.50),
        "deltamem_empty_memory": system(0.10),
        "deltamem_other_memory": system(0.25),
    }
    targets = check_targets(systems)
    assert targets == {
        "deltamem >= 0.8 x full_history": True,  # 0.50 >= 0.48
        "deltamem >= 5 x no_history": True,  # 0.50 >= 0.50
        "empty memory inside no_history CI": True,
        "other memory inside no_history CI": False,  # 0.25 > 0.20
    }
    systems["deltamem"] = system(0.45)
    assert not any(list(check_targets(systems).values())[:2])


@pytest.fixture
def tiny_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = smollm2_tokenizer()

    def load(name: str, **kwargs):
        model = tiny_model_for(tokenizer)
        return model, tokenizer

    monkeypatch.setattr(peft_deltamem.models, "load_base_model", load)


def test_demo_writes_results_json_with_every_system_level_and_the_curve(tiny_smollm2, tmp_path, capsys) -> None:
    output = tmp_path / "demo"
    args = ["--output", str(output), "--train-minutes", "5", "--n-train", "16", "--n-eval", "6", "--n-probe", "4"]
    args += ["--probe-every", "1", "--no-progress", "--max_steps", "2", "--disable_tqdm", "true"]
    args += ["--deltamem.layers_to_transform", "[0,1]"]  # the recipe's top-6 layers of 30 do not exist in 2 layers
    assert main(args) == 0

    results = json.loads((output / "results.json").read_text())
    for name in SYSTEMS:  # the issue's schema: each system with its accuracy and interval
        assert 0.0 <= results[name]["accuracy"] <= 1.0
        low, high = results[name]["accuracy_ci"]
        assert low <= results[name]["accuracy"] <= high
    assert results["level"] == 2 and set(results["levels"]) == {"L1", "L2"}
    assert results["targets"] == check_targets({name: results[name] for name in SYSTEMS})
    training = results["training"]
    assert training["train_levels"] == [1, 2] and [s["levels"] for s in training["stages"]] == [[1], [1, 2]]
    assert training["fact_types"] == ["colour"] and training["steps"] == 4  # 2 steps per stage
    steps = [point["step"] for point in training["curve"]]
    assert steps == [0, 1, 2, 3, 4]  # probed before training and after every step, numbered across stages
    minutes = [point["minutes"] for point in training["curve"]]
    assert minutes == sorted(minutes)
    assert results["session"]["expected"] == "purple" and "correct" in results["session"]
    assert {p.name for p in output.iterdir()} >= {
        "results.json",
        "records.json",
        "results.md",
        "results.png",
        "training_curve.png",
        "adapter",
    }
    saved = json.loads((output / "adapter" / "deltamem_training.json").read_text())
    assert saved["write_pass_reads"] is False and saved["level"] == 2
    out = capsys.readouterr().out
    assert "stage 2/2: levels [1, 2]" in out and "Targets:" in out
    assert "[probe] step    4" in out  # printed with the step count across stages
