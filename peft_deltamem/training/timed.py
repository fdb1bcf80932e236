"""Train a δ-mem adapter within a time budget, with a training-time probe curve and a level curriculum.

The training half of ``deltamem demo`` (:mod:`peft_deltamem.cli.demo`), usable on its own: :func:`train_adapter` runs
:class:`~peft_deltamem.training.DeltaMemSFTTrainer` with a recipe (``deltamem train`` format) for at most some minutes
(:class:`TimeBudgetCallback`), probing own- vs other-memory accuracy on held-out conversations as it goes
(:class:`ProbeCallback`); :func:`train_curriculum` chains such runs over recall-ladder levels
(:func:`curriculum_stages`).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..evaluation import EvalSettings, evaluate_task, recall_task
from ..evaluation.ladder import level_fact_types as ladder_level_fact_types
from ..evaluation.ladder import make_ladder
from .recipe import RECIPES_DIR, parse_recipe, recipe_file
from .trainer import DeltaMemSFTTrainer

# ------------------------------------------------------------------------------------------------------- callbacks

PROBE_SYSTEMS = ("deltamem", "deltamem_other_memory")
#: What a probe runs: forced choice only (no generation), from own and from another conversation's memory.
PROBE_SETTINGS = EvalSettings(systems=PROBE_SYSTEMS, generate=False, progress=False, batch_size=32)


class TimeBudgetCallback(TrainerCallback):
    """Stop training once ``minutes`` of training time have passed (checked after every optimiser step).

    Time spent inside :class:`ProbeCallback` probes is not counted (``excluded_seconds``), so the budget is the time
    spent training, and the probes do not shorten it.

    ``clock="wall"`` counts wall-clock time. ``clock="process"`` counts this process's CPU time divided by torch's
    thread count: on a machine shared with other jobs, that is the wall time the same work would take with those
    cores to itself (used for the measurements in ``docs/evaluation.md``).
    """

    def __init__(self, minutes: float, clock: str = "wall") -> None:
        if minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        if clock not in ("wall", "process"):
            raise ValueError(f"clock must be 'wall' or 'process', got {clock!r}")
        self.seconds = 60.0 * minutes
        self.clock = clock
        self.start: float | None = None
        self.excluded_seconds = 0.0

    def now(self) -> float:
        """The current reading of the clock, in seconds."""
        if self.clock == "wall":
            return time.perf_counter()
        return time.process_time() / max(torch.get_num_threads(), 1)

    def elapsed(self) -> float:
        """Training seconds so far (probe time excluded)."""
        return 0.0 if self.start is None else self.now() - self.start - self.excluded_seconds

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.start = self.now()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.elapsed() >= self.seconds:
            control.should_training_stop = True
        return control


class ProbeCallback(TrainerCallback):
    """Every ``every_steps`` optimiser steps, score forced-choice accuracy of a few held-out conversations from their
    own memory and from another conversation's memory: the training-time curve.

    Each point is ``{"step", "minutes" (training time, probes excluded), "loss" (last logged), "own", "other",
    "gap" (mean gold log-prob own − other)}``. The empty-memory control is not probed: a zero memory reads zero, so
    it is the base model whatever the training.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        examples: Sequence[Mapping[str, Any]],
        every_steps: int,
        budget: TimeBudgetCallback,
        settings: EvalSettings | None = None,
        start: tuple[int, float] = (0, 0.0),
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.task = recall_task(examples, name="probe")
        self.every_steps = every_steps
        self.budget = budget
        self.settings = settings or PROBE_SETTINGS
        self.curve: list[dict[str, float]] = []
        self.start_step, self.start_minutes = start  # where an earlier curriculum stage left off
        self._last_loss: float | None = None

    def probe(self, step: int) -> dict[str, float]:
        """Score the probe set now and append a point to the curve."""
        start, trained = self.budget.now(), self.budget.elapsed()  # read before the probe: its time is not training
        result = evaluate_task(self.model, self.tokenizer, self.task, self.settings)
        systems = result["systems"]
        point = {
            "step": self.start_step + step,
            "minutes": round(self.start_minutes + trained / 60.0, 3),
            "loss": self._last_loss,
            # None where the probe set has no answer set to score without generating (the working-style levels):
            # the gold log-prob gap is the curve there.
            "own": systems["deltamem"].get("accuracy"),
            "other": systems["deltamem_other_memory"].get("accuracy"),
            "gap": result["diagnostics"]["own_minus_other_gold_logprob"]["mean"],
        }
        self.curve.append(point)
        loss = "   –  " if point["loss"] is None else f"{point['loss']:6.3f}"
        own, other = (f"{point[k]:.2f}" if point[k] is not None else "  – " for k in ("own", "other"))
        print(
            f"[probe] step {point['step']:4d}  {point['minutes']:5.2f} min  loss {loss}  own memory {own}  "
            f"other memory {other}  gold log-prob gap {point['gap']:+.2f}",
            flush=True,
        )
        if self.budget.start is not None:  # a probe before training starts costs no training time anyway
            self.budget.excluded_seconds += self.budget.now() - start
        return point

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs: Any):
        if logs and "loss" in logs:
            self._last_loss = float(logs["loss"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self.probe(state.global_step)
        return control


@dataclass
class TrainResult:
    """What :func:`train_adapter` returns besides the model."""

    steps: int
    train_seconds: float
    probe_seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def add_stage(self, index: int, stage: TrainResult) -> None:
        """Join curriculum stage ``index``'s result onto this one: its curve points and log rows tagged with
        ``stage``, its steps and seconds added."""
        self.curve += [{**point, "stage": index} for point in stage.curve]
        self.log_history += [{**row, "stage": index} for row in stage.log_history]
        self.steps += stage.steps
        self.train_seconds = round(self.train_seconds + stage.train_seconds, 1)
        self.probe_seconds = round(self.probe_seconds + stage.probe_seconds, 1)


# --------------------------------------------------------------------------------------------------------- training

#: The CPU recipe the demo trains with (package data, so an installed wheel has it; ``--recipe`` points elsewhere).
DEFAULT_RECIPE = RECIPES_DIR / "smollm2-135m" / "tsw-cpu.yaml"


def level_fact_types(level: int, fact_types: Sequence[str] | None) -> Sequence[str] | None:
    """The fact types to ask ``make_ladder`` for at ``level``: the part of ``fact_types`` that level accepts, else
    its default (level 5 keeps its open types, levels 6-7 their preference kinds, with ``fact_types=("colour",)``)."""
    return ladder_level_fact_types(level, fact_types)


def ladder_dataset(
    levels: Sequence[int],
    n: int,
    *,
    seed: int = 0,
    fact_types: Sequence[str] | None = None,
    facts: int | None = None,
) -> Any:
    """``n`` training conversations (``messages`` only) spread evenly over ``levels``, shuffled; a ``datasets.Dataset``.

    ``facts`` (2 or 3) sets the number of facts in each level-3 conversation; the other levels ignore it."""

    rows = []
    for i, level in enumerate(levels):
        count = n // len(levels) + (1 if i < n % len(levels) else 0)
        examples = make_ladder(
            level,
            count,
            seed=seed,
            split="train",
            fact_types=level_fact_types(level, fact_types),
            facts=facts if level == 3 else None,
        )
        rows += [{"messages": ex["messages"]} for ex in examples]
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Parse a training recipe (``deltamem train`` format) with ``--key value`` overrides; a :class:`~peft_deltamem.training.recipe.Recipe`."""
    if not recipe_file(path).is_file():
        raise FileNotFoundError(
            f"training recipe {path} not found: pass --recipe with a recipe file or a bundled recipe's name "
            "(recipes/smollm2-135m/tsw-cpu.yaml is the demo's)"
        )
    return parse_recipe([str(path), *overrides])


def train_adapter(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    recipe: Any,
    *,
    minutes: float,
    probe_examples: Sequence[Mapping[str, Any]] = (),
    probe_every: int = 20,
    clock: str = "wall",
    probe_at_start: bool = True,
    probe_start: tuple[int, float] = (0, 0.0),
) -> tuple[Any, TrainResult]:
    """Train a δ-mem adapter on ``model`` with ``recipe`` (:func:`load_recipe`) for at most ``minutes``.

    Uses :class:`~peft_deltamem.training.DeltaMemSFTTrainer` with the recipe's training arguments and adapter config,
    :class:`TimeBudgetCallback` and, with ``probe_examples``, :class:`ProbeCallback`. Returns the trained
    ``PeftModel`` (eval mode) and a :class:`TrainResult`. A ``model`` that already is a δ-mem ``PeftModel`` (an earlier
    curriculum stage) trains on; its adapter config is kept and the recipe's is ignored.
    """
    budget = TimeBudgetCallback(minutes, clock=clock)
    trainer = DeltaMemSFTTrainer(
        model=model,
        args=recipe.training,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=None if isinstance(model, PeftModel) else recipe.adapter,
        callbacks=[budget],
    )
    probe = None
    if probe_examples:
        settings = dataclasses.replace(
            PROBE_SETTINGS,
            write_pass_reads=recipe.training.write_pass_reads,
            chat_template_kwargs=dict(recipe.training.chat_template_kwargs or {}),
        )
        probe = ProbeCallback(trainer.model, tokenizer, probe_examples, probe_every, budget, settings, probe_start)
        trainer.add_callback(probe)
        if probe_at_start:
            probe.probe(0)
    trainer.train()
    if probe is not None and (
        not probe.curve or probe.curve[-1]["step"] != probe.start_step + trainer.state.global_step
    ):
        probe.probe(trainer.state.global_step)
    peft_model = trainer.model
    peft_model.eval()
    result = TrainResult(
        steps=trainer.state.global_step,
        train_seconds=round(budget.elapsed(), 1),
        probe_seconds=round(budget.excluded_seconds, 1),
        curve=probe.curve if probe is not None else [],
        log_history=list(trainer.state.log_history),
    )
    return peft_model, result


def curriculum_stages(levels: Sequence[int], minutes: float, curriculum: bool = True) -> list[tuple[list[int], float]]:
    """``(levels mixed in the stage's data, minutes)`` of each training stage.

    With ``curriculum``, stage ``k`` trains on the first ``k + 1`` levels mixed, and every stage gets an equal share of
    the time: level 1 alone first, because the memory is not read at all until the model has learned to use it, and
    distractors make that first step much slower (docs/evaluation.md: mixing L1 and L2 from the start showed no
    own-vs-other gap after 94 steps, where L1 alone had one after 40). Without it, one stage mixes all ``levels``.
    """
    levels = list(levels)
    if not curriculum or len(levels) == 1:
        return [(levels, minutes)]
    return [(levels[: k + 1], minutes / len(levels)) for k in range(len(levels))]


def train_curriculum(
    model: Any,
    tokenizer: Any,
    recipe: Any,
    stages: Sequence[tuple[Sequence[int], float]],
    *,
    n_train: int,
    fact_types: Sequence[str] | None = None,
    seed: int = 0,
    **train_kwargs: Any,
) -> tuple[Any, TrainResult]:
    """:func:`train_adapter` once per stage of :func:`curriculum_stages`, on ladder data of the stage's levels (fresh
    conversations per stage); the returned :class:`TrainResult` joins the stages (steps and minutes run on)."""
    total = TrainResult(steps=0, train_seconds=0.0, probe_seconds=0.0)
    for index, (levels, minutes) in enumerate(stages):
        print(f"-- stage {index + 1}/{len(stages)}: levels {list(levels)}, {minutes:g} min --", flush=True)
        dataset = ladder_dataset(levels, n_train, seed=seed + index, fact_types=fact_types)
        model, stage = train_adapter(
            model,
            tokenizer,
            dataset,
            recipe,
            minutes=minutes,
            probe_at_start=index == 0,
            probe_start=(total.steps, total.train_seconds / 60.0),
            **train_kwargs,
        )
        total.add_stage(index, stage)
    return model, total
