"""The working-style levels under the memory-only protocol, on a tiny random model: scoring, summaries, reports."""

from __future__ import annotations

import pytest
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig
from peft_deltamem.evaluation import SYSTEMS, EvalSettings, evaluate_recall, make_ladder, recall_task
from peft_deltamem.evaluation.report import group_table, markdown_table
from peft_deltamem.evaluation.style import STYLE_MIN_NEW_TOKENS
from peft_deltamem.evaluation.style_scoring import style_scores
from tests.helpers.chat_fixtures import smollm2_tokenizer
from tests.helpers.tiny_models import randomize_adapter, tiny_model_for

FAST = dict(batch_size=4, progress=False, n_resamples=200, max_new_tokens=3)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def result(tokenizer):
    model = get_peft_model(tiny_model_for(tokenizer), DeltaMemConfig(task_type="CAUSAL_LM", r=4, beta_bias_init=0.0))
    randomize_adapter(model)
    return evaluate_recall(model.eval(), tokenizer, 7, 4, settings=EvalSettings(**FAST))


def test_style_levels_score_whether_answers_follow_each_preference(result) -> None:
    assert result["metric"] == "followed" and list(result["systems"]) == list(SYSTEMS)
    assert result["settings"]["max_new_tokens"] == STYLE_MIN_NEW_TOKENS  # raised from 3: cut answers can't be judged
    examples = {ex["id"]: ex for ex in make_ladder(7, 4, split="test")}
    for name, records in result["records"].items():
        for record in records:
            preferences = examples[record["id"]]["preferences"]
            expected = style_scores(record["prediction"], preferences)
            assert {k: record[k] for k in expected} == expected
            assert record["gold_logprob"] is not None  # of the templated answer: the own-vs-other gap
            if name not in ("full_history", "bm25"):
                assert record["history_turns_in_prompt"] == 0
        summary = result["systems"][name]
        assert summary["accuracy"] == pytest.approx(sum(r["followed"] for r in records) / len(records))
        kinds = {p["kind"] for ex in examples.values() for p in ex["preferences"]}
        assert set(summary["by_preference"]) == kinds
    assert "own_minus_other_gold_logprob" in result["diagnostics"]
    assert "accuracy (followed)" in markdown_table(result)
    assert "language" in group_table(result, "by_preference")


def test_style_tasks_need_generation_and_cannot_mix_with_recall_levels(tokenizer) -> None:
    model = get_peft_model(tiny_model_for(tokenizer), DeltaMemConfig(task_type="CAUSAL_LM", r=4))
    with pytest.raises(ValueError, match="generate=True"):
        evaluate_recall(model, tokenizer, 6, 2, settings=EvalSettings(generate=False, **{**FAST}))
    with pytest.raises(ValueError, match="cannot share a task"):
        recall_task(make_ladder(1, 2) + make_ladder(6, 2))
