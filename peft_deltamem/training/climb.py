"""A climb plan: a staged curriculum over ladder levels and fact types, each stage a fixed number of optimiser steps.

The long CPU recipe of ``make climb`` (``recipes/smollm2-135m/climb-cpu.yaml``, package data beside the demo's
recipe) is such a plan. It names a training recipe (``deltamem train`` format) with ``--key value`` overrides, the
stages, the training-time probe and the levels to evaluate. Stages count steps, not minutes, so a run does the same
work on a busy machine as on an idle one; each stage trains on fresh ladder conversations and starts from the
previous stage's adapter (a curriculum in the sense of ARMT: what one stage learned is the start of the next).

A plan file::

    recipe: smollm2-135m/tsw-cpu        # a bundled recipe or a file
    overrides: [--deltamem.r, "16"]     # optional, as on the command line of deltamem train
    stages:                              # in order; fact_types 'all' (the default) or a list
      - {levels: [1], fact_types: [colour], steps: 100}
      - {levels: [1, 3], facts: 2, steps: 200}   # facts: level 3 with 2 facts a conversation (default 3)
      - {levels: [1, 3], steps: 200, lr_scheduler_type: linear}   # this stage's schedule (default: the recipe's)
    probe: {level: 3, n: 30, every: 25}  # optional
    eval: {levels: [1, 2, 3, 4, 5, 6, 7], n: 50, level: 3}   # level: the headline level of results.json
    # eval may also set batch_size: questions per model call (default 16, as deltamem eval)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer_utils import SchedulerType

from ..evaluation.ladder import LEVEL_3_FACTS, LEVELS
from .recipe import RECIPES_DIR, recipe_file
from .timed import TrainResult, ladder_dataset, load_recipe, train_adapter

#: The long CPU recipe of ``make climb``.
DEFAULT_PLAN = RECIPES_DIR / "smollm2-135m" / "climb-cpu.yaml"

_PLAN_KEYS = {"recipe", "overrides", "stages", "probe", "eval"}
_STAGE_KEYS = {"levels", "fact_types", "steps", "n_train", "facts", "lr_scheduler_type"}
#: The learning-rate schedules a stage may name (transformers' ``lr_scheduler_type``, less the one that needs an
#: evaluation metric).
_SCHEDULES = tuple(s.value for s in SchedulerType if s is not SchedulerType.REDUCE_ON_PLATEAU)
_PROBE_KEYS = {"level", "n", "every"}
_EVAL_KEYS = {"levels", "n", "level", "batch_size"}


class PlanError(ValueError):
    """A climb plan that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ClimbStage:
    """One curriculum stage: ``steps`` optimiser steps on fresh conversations of ``levels`` mixed evenly."""

    levels: tuple[int, ...]
    steps: int
    fact_types: tuple[str, ...] | None = None  # None: every closed type (and each level's own default)
    n_train: int | None = None  # conversations generated; None: enough for every step to see new ones
    facts: int | None = None  # facts per level-3 conversation (2 or 3); None: 3, the level as defined
    lr_scheduler_type: str | None = None  # the stage's learning-rate schedule; None: the recipe's


@dataclass(frozen=True)
class ClimbPlan:
    """A parsed plan file (module docstring)."""

    recipe: str
    stages: tuple[ClimbStage, ...]
    overrides: tuple[str, ...] = ()
    probe_level: int | None = None
    probe_n: int = 30
    probe_every: int = 25
    eval_levels: tuple[int, ...] = (1, 2, 3)
    eval_n: int = 50
    eval_batch_size: int = 16
    level: int = 3
    source: str = "plan"

    @property
    def steps(self) -> int:
        """Optimiser steps over all stages."""
        return sum(stage.steps for stage in self.stages)


def _fail(source: str, where: str, message: str) -> PlanError:
    return PlanError(f"{source}: {where}: {message}")


def _reject_unknown(block: Mapping[str, Any], known: set[str], source: str, prefix: str = "") -> None:
    unknown = sorted(set(block) - known)
    if unknown:
        raise _fail(source, f"{prefix}{unknown[0]}", f"unknown field (known: {sorted(known)})")


def _level_list(value: Any, source: str, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or any(v not in LEVELS for v in value):
        raise _fail(source, where, f"must be a non-empty list of ladder levels {sorted(LEVELS)}, got {value!r}")
    return tuple(value)


def _positive(value: Any, source: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(source, where, f"must be a positive integer, got {value!r}")
    return value


def _stage(raw: Any, index: int, source: str) -> ClimbStage:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be a mapping with levels and steps")
    unknown = sorted(set(raw) - _STAGE_KEYS)
    if unknown:
        raise _fail(source, where, f"unknown field {unknown[0]!r} (known: {sorted(_STAGE_KEYS)})")
    if "levels" not in raw or "steps" not in raw:
        raise _fail(source, where, "needs both 'levels' and 'steps'")
    types = raw.get("fact_types", "all")
    if types == "all" or types is None:
        fact_types = None
    elif isinstance(types, list) and types and all(isinstance(t, str) for t in types):
        fact_types = tuple(types)
    else:
        raise _fail(source, f"{where}.fact_types", f"must be 'all' or a list of fact types, got {types!r}")
    n_train = raw.get("n_train")
    levels = _level_list(raw["levels"], source, f"{where}.levels")
    facts = raw.get("facts")
    if facts is not None and (isinstance(facts, bool) or facts not in LEVEL_3_FACTS or 3 not in levels):
        raise _fail(
            source, f"{where}.facts", f"sets level 3's number of facts: 2 or 3, with 3 in levels, got {facts!r}"
        )
    schedule = raw.get("lr_scheduler_type")
    if schedule is not None and schedule not in _SCHEDULES:
        raise _fail(source, f"{where}.lr_scheduler_type", f"must be one of {list(_SCHEDULES)}, got {schedule!r}")
    return ClimbStage(
        levels=levels,
        steps=_positive(raw["steps"], source, f"{where}.steps"),
        fact_types=fact_types,
        n_train=None if n_train is None else _positive(n_train, source, f"{where}.n_train"),
        facts=facts,
        lr_scheduler_type=schedule,
    )


def parse_plan(values: Mapping[str, Any], source: str = "plan") -> ClimbPlan:
    """A :class:`ClimbPlan` from a plan's mapping; :class:`PlanError` names ``source`` and the field at fault."""
    if not isinstance(values, Mapping):
        raise PlanError(f"{source}: a climb plan must be a YAML mapping")
    _reject_unknown(values, _PLAN_KEYS, source)
    if not isinstance(values.get("recipe"), str):
        raise _fail(source, "recipe", "a training recipe (bundled name or file) is required")
    overrides = values.get("overrides") or []
    if not isinstance(overrides, list):
        raise _fail(source, "overrides", "must be a list of command-line words, e.g. [--deltamem.r, '16']")
    stages = values.get("stages")
    if not isinstance(stages, list) or not stages:
        raise _fail(source, "stages", "must be a non-empty list of stages")
    probe = values.get("probe") or {}
    evaluation = values.get("eval") or {}
    for name, block, known in (("probe", probe, _PROBE_KEYS), ("eval", evaluation, _EVAL_KEYS)):
        if not isinstance(block, dict):
            raise _fail(source, name, "must be a mapping")
        _reject_unknown(block, known, source, prefix=f"{name}.")
    eval_levels = _level_list(evaluation.get("levels", [1, 2, 3]), source, "eval.levels")
    level = evaluation.get("level", eval_levels[0] if 3 not in eval_levels else 3)
    if level not in eval_levels:
        raise _fail(source, "eval.level", f"must be one of eval.levels {list(eval_levels)}, got {level!r}")
    return ClimbPlan(
        recipe=values["recipe"],
        stages=tuple(_stage(raw, i, source) for i, raw in enumerate(stages)),
        overrides=tuple(str(word) for word in overrides),
        probe_level=_level_list(probe["level"], source, "probe.level")[0] if "level" in probe else None,
        probe_n=_positive(probe.get("n", 30), source, "probe.n"),
        probe_every=_positive(probe.get("every", 25), source, "probe.every"),
        eval_levels=eval_levels,
        eval_n=_positive(evaluation.get("n", 50), source, "eval.n"),
        eval_batch_size=_positive(evaluation.get("batch_size", 16), source, "eval.batch_size"),
        level=level,
        source=source,
    )


def load_plan(path: str | Path) -> ClimbPlan:
    """Read a plan file (or a bundled plan's name, as :func:`~peft_deltamem.training.recipe.recipe_file` resolves)."""
    resolved = recipe_file(path)
    try:
        text = Path(resolved).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{path}: no such climb plan (the bundled one is {DEFAULT_PLAN})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PlanError(f"{path}: not valid YAML: {err}") from err
    return parse_plan(values or {}, source=str(path))


def climb_recipe(plan: ClimbPlan, extra_overrides: Sequence[str] = ()) -> Any:
    """The plan's training recipe with its overrides, then ``extra_overrides`` (the command line's)."""
    return load_recipe(plan.recipe, [*plan.overrides, *extra_overrides])


def stage_schedule(stage: ClimbStage, recipe: Any) -> str:
    """The learning-rate schedule ``stage`` trains with (a transformers name): its own, else the recipe's."""
    recipe_schedule = recipe.training.lr_scheduler_type  # a SchedulerType once the training arguments are built
    return stage.lr_scheduler_type or str(getattr(recipe_schedule, "value", recipe_schedule))


def train_plan(
    model: Any,
    tokenizer: Any,
    plan: ClimbPlan,
    recipe: Any,
    *,
    seed: int = 0,
    probe_examples: Sequence[Mapping[str, Any]] = (),
    clock: str = "wall",
    save_dir: str | Path | None = None,
) -> tuple[Any, TrainResult]:
    """Train every stage of ``plan`` in turn (``model`` may already be a δ-mem ``PeftModel``: training goes on from
    it). Returns the trained model and one :class:`~peft_deltamem.training.timed.TrainResult` over all stages, its
    curve and log rows tagged with the stage index. With ``save_dir``, each stage's adapter is saved to
    ``save_dir/stage-K`` (a later run can start from it)."""
    total = TrainResult(steps=0, train_seconds=0.0, probe_seconds=0.0)
    batch = recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps
    recipe_schedule = recipe.training.lr_scheduler_type
    schedules = [stage_schedule(stage, recipe) for stage in plan.stages]  # before a stage sets the recipe's
    try:
        for index, (stage, schedule) in enumerate(zip(plan.stages, schedules, strict=True)):
            n_train = stage.n_train or stage.steps * batch
            print(
                f"-- stage {index + 1}/{len(plan.stages)}: levels {list(stage.levels)}, fact types "
                f"{list(stage.fact_types) if stage.fact_types else 'all'}"
                f"{f', {stage.facts} facts at level 3' if stage.facts else ''}, {stage.steps} steps"
                f"{f', {stage.lr_scheduler_type} schedule' if stage.lr_scheduler_type else ''} --",
                flush=True,
            )
            dataset = ladder_dataset(
                stage.levels, n_train, seed=seed + 1000 * index, fact_types=stage.fact_types, facts=stage.facts
            )
            recipe.training.max_steps = stage.steps  # steps, not time: the same work on a busy machine
            # Each stage has a fresh optimiser and schedule (warm-up included): a decaying stage decays over its own
            # steps.
            recipe.training.lr_scheduler_type = schedule
            model, result = train_adapter(
                model,
                tokenizer,
                dataset,
                recipe,
                minutes=10_000.0,
                probe_examples=probe_examples,
                probe_every=plan.probe_every,
                clock=clock,
                probe_at_start=index == 0,
                probe_start=(total.steps, total.train_seconds / 60.0),
            )
            total.add_stage(index, result)
            if save_dir is not None:
                model.save_pretrained(Path(save_dir) / f"stage-{index + 1}")
    finally:
        recipe.training.lr_scheduler_type = recipe_schedule  # the stages' schedules do not outlive the climb
    return model, total


__all__ = [
    "DEFAULT_PLAN",
    "ClimbPlan",
    "ClimbStage",
    "PlanError",
    "climb_recipe",
    "load_plan",
    "parse_plan",
    "stage_schedule",
    "train_plan",
]
