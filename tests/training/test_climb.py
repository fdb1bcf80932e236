"""Climb plans (the long CPU recipe): the bundled plan parses, bad plans name the field, stages count steps."""

from __future__ import annotations

import pytest

from peft_deltamem.evaluation.ladder import DISTRACTORS, LEVELS
from peft_deltamem.training.climb import DEFAULT_PLAN, ClimbStage, PlanError, climb_recipe, load_plan, parse_plan
from peft_deltamem.training.timed import ladder_dataset

GOOD = {"recipe": "smollm2-135m/tsw-cpu", "stages": [{"levels": [1], "fact_types": ["colour"], "steps": 5}]}


def test_the_bundled_plan_parses_and_its_recipe_loads() -> None:
    plan = load_plan("recipes/smollm2-135m/climb-cpu.yaml")
    assert load_plan(DEFAULT_PLAN).stages == plan.stages
    assert plan.stages[0].levels == (1,) and plan.steps == sum(s.steps for s in plan.stages) > 0
    assert all(set(s.levels) <= set(LEVELS) for s in plan.stages)
    assert set(plan.eval_levels) == set(LEVELS)  # every level of the ladder is evaluated, L1-L5 and working style
    assert plan.level in plan.eval_levels and plan.probe_level is not None
    recipe = climb_recipe(plan)
    assert recipe.training.use_cpu and recipe.adapter.write_granularity in ("token", "message")
    assert recipe.adapter.write_roles == ["user"]  # the plan's override reaches the adapter as a list


def test_a_plan_with_defaults() -> None:
    plan = parse_plan(GOOD)
    assert plan.stages == (ClimbStage(levels=(1,), steps=5, fact_types=("colour",)),)
    assert (plan.eval_levels, plan.eval_n, plan.level, plan.probe_level) == ((1, 2, 3), 50, 3, None)
    assert plan.eval_batch_size == 16  # deltamem eval's default
    assert parse_plan({**GOOD, "eval": {"batch_size": 50}}).eval_batch_size == 50
    assert parse_plan({**GOOD, "stages": [{"levels": 3, "steps": 2, "fact_types": "all"}]}).stages[0] == ClimbStage(
        levels=(3,), steps=2
    )
    two = parse_plan({**GOOD, "stages": [{"levels": [1, 3], "steps": 2, "facts": 2}]}).stages[0]
    assert two == ClimbStage(levels=(1, 3), steps=2, facts=2)
    decay = parse_plan({**GOOD, "stages": [{"levels": [1], "steps": 2, "lr_scheduler_type": "linear"}]}).stages[0]
    assert decay == ClimbStage(levels=(1,), steps=2, lr_scheduler_type="linear")


def test_a_stages_facts_reach_level_3_only() -> None:
    """ladder_dataset with facts=2: level-3 rows state two facts instead of three, level-1 rows are unchanged."""

    def facts_per_row(dataset) -> list[int]:  # user turns that are neither a distractor nor the final question
        return sorted(
            sum(m["role"] == "user" and m["content"] not in dict(DISTRACTORS) for m in row[:-2])
            for row in dataset["messages"]
        )

    assert facts_per_row(ladder_dataset([1, 3], 40, seed=5)) == [1] * 20 + [3] * 20
    assert facts_per_row(ladder_dataset([1, 3], 40, seed=5, facts=2)) == [1] * 20 + [2] * 20


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": [1]}, "plan.yaml: stage: unknown field"),
        ({"recipe": None}, "plan.yaml: recipe: a training recipe"),
        ({"stages": []}, "plan.yaml: stages: must be a non-empty list"),
        ({"stages": [{"levels": [1]}]}, r"plan.yaml: stages\[0\]: needs both 'levels' and 'steps'"),
        ({"stages": [{"levels": [9], "steps": 1}]}, r"plan.yaml: stages\[0\].levels: must be a non-empty list"),
        ({"stages": [{"levels": [1], "steps": 0}]}, r"plan.yaml: stages\[0\].steps: must be a positive integer"),
        ({"stages": [{"levels": [1], "steps": 1, "lr": 1}]}, r"plan.yaml: stages\[0\]: unknown field 'lr'"),
        ({"eval": {"levels": [1, 2], "level": 3}}, "plan.yaml: eval.level: must be one of eval.levels"),
        ({"overrides": "--deltamem.r 16"}, "plan.yaml: overrides: must be a list"),
        (
            {"stages": [{"levels": [1], "steps": 1, "lr_scheduler_type": "reduce_lr_on_plateau"}]},
            r"stages\[0\].lr_scheduler_type: must be one of \['linear', 'cosine'.*got 'reduce_lr_on_plateau'",
        ),
        ({"eval": {"batch_size": 0}}, "plan.yaml: eval.batch_size: must be a positive integer, got 0"),
        ({"eval": {"batch": 8}}, r"plan.yaml: eval.batch: unknown field \(known: \['batch_size', 'level'"),
        ({"probe": {"level": 3, "every_steps": 9}}, r"plan.yaml: probe.every_steps: unknown field"),
        ({"stages": [{"levels": [1, 2], "steps": 1, "facts": 2}]}, r"stages\[0\].facts: .* with 3 in levels"),
        ({"stages": [{"levels": [3], "steps": 1, "facts": 4}]}, r"stages\[0\].facts: .* 2 or 3, .* got 4"),
    ],
)
def test_a_bad_plan_names_the_file_and_the_field(change: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan({**GOOD, **change}, source="plan.yaml")


def test_a_missing_plan_file_says_which_and_where_the_bundled_one_is(tmp_path) -> None:
    with pytest.raises(PlanError, match="no such climb plan .*climb-cpu.yaml"):
        load_plan(tmp_path / "nope.yaml")
