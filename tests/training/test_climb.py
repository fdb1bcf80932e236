"""Climb plans (the long CPU recipe): the bundled plan parses, bad plans name the field, stages count steps."""

from __future__ import annotations

import pytest

from peft_deltamem.evaluation.ladder import LEVELS
from peft_deltamem.training.climb import DEFAULT_PLAN, ClimbStage, PlanError, climb_recipe, load_plan, parse_plan

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


def test_a_plan_with_defaults() -> None:
    plan = parse_plan(GOOD)
    assert plan.stages == (ClimbStage(levels=(1,), steps=5, fact_types=("colour",)),)
    assert (plan.eval_levels, plan.eval_n, plan.level, plan.probe_level) == ((1, 2, 3), 50, 3, None)
    assert parse_plan({**GOOD, "stages": [{"levels": 3, "steps": 2, "fact_types": "all"}]}).stages[0] == ClimbStage(
        levels=(3,), steps=2
    )


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
    ],
)
def test_a_bad_plan_names_the_file_and_the_field(change: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan({**GOOD, **change}, source="plan.yaml")


def test_a_missing_plan_file_says_which_and_where_the_bundled_one_is(tmp_path) -> None:
    with pytest.raises(PlanError, match="no such climb plan .*climb-cpu.yaml"):
        load_plan(tmp_path / "nope.yaml")
