"""``deltamem demo``: train a δ-mem adapter on SmolLM2-135M-Instruct on a CPU in minutes and show it recall.

Steps: provision the base model (offline route, :mod:`peft_deltamem.interop.base_models`); generate the recall ladder's training
split; train a TSW adapter with the CPU recipe (``recipes/smollm2-135m/tsw-cpu.yaml``, bundled with the package) for at most
``--train-minutes`` of wall-clock time, level by level (a curriculum), probing own- vs other-memory accuracy on a few
held-out conversations as it goes (the training-time curve; :mod:`peft_deltamem.training.timed`); evaluate the memory-only
protocol (:mod:`peft_deltamem.evaluation.protocol`) on the test split of every requested level; print the table,
save ``results.json``, ``results.md`` and the plots; finish with a scripted
:class:`~peft_deltamem.chat.session.MemorySession` exchange in which a fact from an early turn is recalled with the
history out of the prompt; and check the targets (:func:`check_targets`: forced choice, greedy exact match and the
session's answer). A missed target makes the demo exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..chat.session import MemorySession
from ..evaluation import EvalSettings, evaluate_recall
from ..evaluation.ladder import make_ladder
from ..evaluation.metrics import contains_match
from ..evaluation.report import (
    levels_table,
    markdown_table,
    plot_results,
    plot_training_curve,
    write_json,
    write_run_results,
)
from ..interop.base_models import load_base_model
from ..training.timed import (
    DEFAULT_RECIPE,
    TrainResult,
    curriculum_stages,
    level_fact_types,
    load_recipe,
    train_curriculum,
)
from ._args import ArgumentParser, parse_levels
from .eval import TRAINING_INFO_FILE

# ------------------------------------------------------------------------------------------------------- the demo

#: A scripted chat for the MemorySession finale: the fact comes first, small talk pushes it out of the prompt.
SESSION_SCRIPT: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "My favourite colour is {value}."},
    {"role": "assistant", "content": "Got it, I will remember that."},
    {"role": "user", "content": "How often should I water a cactus?"},
    {"role": "assistant", "content": "Only when the soil is completely dry, which is not often."},
)
SESSION_QUESTION = "What is my favourite colour? Answer with one word."


def session_exchange(model: Any, tokenizer: Any, value: str = "purple") -> dict[str, Any]:
    """A short :class:`~peft_deltamem.chat.session.MemorySession` chat: the early turns (a fact, then small talk) are written
    into memory, and the question is answered from a prompt that holds the question alone. The base model (adapter
    disabled) gets the same prompt for comparison. Returns the transcript and whether the answer was right."""

    history = [{**m, "content": m["content"].format(value=value)} for m in SESSION_SCRIPT]
    session = MemorySession(model, tokenizer, keep_last=0)
    session.write(history)
    prompt = session.prompt_messages(SESSION_QUESTION)
    answer = session.reply(SESSION_QUESTION, max_new_tokens=8, do_sample=False)
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with model.disable_adapter():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    base_answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return {
        "written_turns": history,
        "prompt": prompt,
        "answer": answer,
        "base_answer_same_prompt": base_answer,
        "expected": value,
        "correct": bool(contains_match(answer, value)),
    }


#: The greedy-generation bar of the targets: δ-mem's exact match (greedy answers, memory only) must reach this. It is
#: the forced-choice bar "≥ 5 × no history" with no history at chance (10 % for the demo's colours): a generation
#: that lost its memory answers at chance or worse even when the forced choice is perfect.
GREEDY_EXACT_MATCH_BAR = 0.5


def check_targets(
    systems: Mapping[str, Mapping[str, Any]], session: Mapping[str, Any] | None = None
) -> dict[str, bool]:
    """The demo's targets: ``{name: met}``.

    Forced choice (issue 6, ``accuracy``): memory-only accuracy ≥ 80 % of full history and ≥ 5× no history, and both
    controls inside the no-history 95 % interval. Greedy generation (issue 12, ``exact_match``, what a user sees):
    memory-only exact match ≥ :data:`GREEDY_EXACT_MATCH_BAR`, and its 95 % interval entirely above no history's. With
    ``session`` (:func:`session_exchange`'s result), also: the scripted MemorySession's answer contains the stored
    value. A metric that was not measured counts as a missed target.
    """
    acc = {name: s["accuracy"] for name, s in systems.items()}
    lo, hi = systems["no_history"]["accuracy_ci"]
    greedy = systems["deltamem"].get("exact_match")
    greedy_ci = systems["deltamem"].get("exact_match_ci")
    base_ci = systems["no_history"].get("exact_match_ci")
    targets = {
        "deltamem >= 0.8 x full_history": acc["deltamem"] >= 0.8 * acc["full_history"],
        "deltamem >= 5 x no_history": acc["deltamem"] >= 5 * acc["no_history"],
        "empty memory inside no_history CI": lo <= acc["deltamem_empty_memory"] <= hi,
        "other memory inside no_history CI": lo <= acc["deltamem_other_memory"] <= hi,
        f"deltamem greedy exact match >= {GREEDY_EXACT_MATCH_BAR:g}": (
            greedy is not None and greedy >= GREEDY_EXACT_MATCH_BAR
        ),
        "deltamem greedy exact match CI above no_history's": (
            greedy_ci is not None and base_ci is not None and greedy_ci[0] > base_ci[1]
        ),
    }
    if session is not None:
        targets[f"MemorySession answer contains the stored value ({session['expected']})"] = bool(session["correct"])
    return targets


def failed_targets(targets: Mapping[str, bool]) -> list[str]:
    """The names of the targets that were missed."""
    return [name for name, ok in targets.items() if not ok]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="deltamem demo",
        description="Train a δ-mem adapter on SmolLM2-135M-Instruct on CPU and evaluate it (memory-only protocol).",
        epilog="Exit status 1 when a target is missed (forced choice, greedy exact match from memory only, or the "
        "closing MemorySession answer); see docs/evaluation.md.",
    )
    parser.add_argument("--train-minutes", type=float, default=10.0, help="training time budget (default 10)")
    parser.add_argument("--output", default="demo-output", help="directory for the adapter, results and plots")
    parser.add_argument(
        "--level", type=int, default=2, choices=range(1, 6), help="the demo's ladder level (default 2: distractors)"
    )
    parser.add_argument(
        "--train-levels",
        type=parse_levels,
        default=None,
        help="comma-separated levels of the training data (default: every level from 1 to --level)",
    )
    parser.add_argument(
        "--no-curriculum",
        action="store_true",
        help="mix all training levels from the start (default: stage k adds level k, equal time per stage)",
    )
    parser.add_argument(
        "--eval-levels",
        type=parse_levels,
        default=None,
        help="comma-separated levels to evaluate (default: the training levels)",
    )
    parser.add_argument(
        "--fact-types",
        default="colour",
        help="comma-separated fact types, or 'all' (default: colour, a favourite colour from 10)",
    )
    parser.add_argument("--n-train", type=int, default=8000, help="training conversations generated (default 8000)")
    parser.add_argument("--n-eval", type=int, default=50, help="test conversations per level (default 50)")
    parser.add_argument("--n-probe", type=int, default=30, help="held-out conversations of the training-time curve")
    parser.add_argument("--probe-every", type=int, default=25, help="steps between probes (0: no curve)")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="training recipe (deltamem train format)")
    parser.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="base model name or directory")
    parser.add_argument(
        "--clock", choices=("wall", "process"), default="wall", help="what the time budget counts (see docs)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars during evaluation")
    args, overrides = parser.parse_known_args(argv)
    args.recipe_overrides = overrides  # anything else goes to the recipe, e.g. --learning_rate 1e-3 --deltamem.r 16
    return args


def _print(text: str = "") -> None:
    print(text, flush=True)


def evaluate_levels(
    model: Any,
    tokenizer: Any,
    levels: Sequence[int],
    n: int,
    *,
    fact_types: Sequence[str] | None,
    settings: EvalSettings,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """The memory-only protocol on the test split of every level in ``levels``: ``{"L1": result, ...}``."""

    results = {}
    for level in levels:
        _print(f"\n== evaluating level {level} ({n} test conversations, 6 systems) ==")
        types = level_fact_types(level, fact_types)
        results[f"L{level}"] = evaluate_recall(
            model, tokenizer, level, n, seed=seed, split="test", fact_types=types, settings=settings
        )
    return results


def save_trained_adapter(
    model: Any, output: Path, recipe: Any, trained: TrainResult, info: Mapping[str, Any]
) -> dict[str, Any]:
    """Report the training, save the adapter to ``output/adapter`` and beside it what evaluating it needs
    (:data:`~peft_deltamem.cli.eval.TRAINING_INFO_FILE`): the recipe's write pass and recent messages, ``info`` (the
    command's own settings), the steps and the training time. Returns that record."""
    _print(
        f"trained {trained.steps} steps in {trained.train_seconds / 60:.1f} min (+{trained.probe_seconds:.0f} s probes)"
    )
    model.save_pretrained(output / "adapter")
    training_info = {
        "write_pass_reads": recipe.training.write_pass_reads,
        "recent_messages": recipe.training.recent_messages,
        **info,
        "steps": trained.steps,
        "train_seconds": trained.train_seconds,
    }
    write_json(training_info, output / "adapter" / TRAINING_INFO_FILE)
    return training_info


def recipe_eval_settings(recipe: Any, args: argparse.Namespace, **settings: Any) -> EvalSettings:
    """The evaluation settings of an adapter trained with ``recipe``: its write pass and chat template arguments, the
    command's ``--seed`` and ``--no-progress``, and any other :class:`EvalSettings` field in ``settings``."""
    return EvalSettings(
        write_pass_reads=recipe.training.write_pass_reads,
        chat_template_kwargs=dict(recipe.training.chat_template_kwargs or {}),
        progress=not args.no_progress,
        seed=args.seed,
        **settings,
    )


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``deltamem demo`` does (see the module docstring); returns what it writes to ``results.json``."""

    started = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    fact_types = tuple(args.fact_types.split(",")) if args.fact_types not in (None, "", "all") else None
    train_levels = args.train_levels or list(range(1, args.level + 1))
    eval_levels = args.eval_levels or sorted(set(train_levels) | {args.level})
    torch.manual_seed(args.seed)

    _print(f"== 1/5 base model: {args.base} ==")
    model, tokenizer = load_base_model(args.base)
    recipe = load_recipe(
        args.recipe,
        ["--output_dir", str(output / "adapter"), "--seed", str(args.seed), *args.recipe_overrides],
    )
    _print(
        f"== 2/5 training a δ-mem adapter on ladder level(s) {train_levels} for at most {args.train_minutes:g} min "
        f"({args.clock} clock), recipe {args.recipe} =="
    )
    stages = curriculum_stages(train_levels, args.train_minutes, curriculum=not args.no_curriculum)
    probe_types = level_fact_types(args.level, fact_types)
    probe = make_ladder(args.level, args.n_probe, seed=10_000 + args.seed, split="train", fact_types=probe_types)
    model, trained = train_curriculum(
        model,
        tokenizer,
        recipe,
        stages,
        n_train=args.n_train,
        fact_types=fact_types,
        seed=args.seed,
        probe_examples=probe if args.probe_every else (),
        probe_every=args.probe_every,
        clock=args.clock,
    )
    training_info = save_trained_adapter(
        model,
        output,
        recipe,
        trained,
        {
            "level": args.level,
            "train_levels": train_levels,
            "stages": [{"levels": list(levels), "minutes": minutes} for levels, minutes in stages],
            "fact_types": list(fact_types or []),
            "clock": args.clock,
            "recipe": str(args.recipe),
            "recipe_overrides": list(args.recipe_overrides),
        },
    )

    _print("== 3/5 evaluation: memory-only protocol (docs/design.md §7) ==")
    settings = recipe_eval_settings(recipe, args)
    levels = evaluate_levels(
        model, tokenizer, eval_levels, args.n_eval, fact_types=fact_types, settings=settings, seed=args.seed
    )
    demo_result = levels[f"L{args.level}"]

    _print("== 4/5 results ==")
    table = markdown_table(demo_result)
    overview = levels_table(levels)
    _print(f"\nLevel {args.level} (accuracy = {demo_result['metric'].replace('_', ' ')}, %, 95 % bootstrap CI):\n")
    _print(table)
    if len(levels) > 1:
        _print("\nAll evaluated levels:\n")
        _print(overview)
    plot_results(levels, output / "results.png", title="δ-mem on SmolLM2-135M-Instruct, memory-only recall")
    if trained.curve:
        plot_training_curve(
            trained.curve, output / "training_curve.png", title=f"Level {args.level}: training-time curve"
        )

    _print("\n== 5/5 MemorySession: a fact from an early turn, recalled with the history out of the prompt ==")
    session = session_exchange(model, tokenizer)
    for message in session["written_turns"]:
        _print(f"  [written to memory] {message['role']}: {message['content']}")
    _print(f"  [prompt] user: {SESSION_QUESTION}")
    _print(f"  δ-mem answer (memory only): {session['answer']!r}  -> {'correct' if session['correct'] else 'WRONG'}")
    _print(f"  base model, same prompt:    {session['base_answer_same_prompt']!r}")

    targets = check_targets(demo_result["systems"], session)
    failed = failed_targets(targets)
    _print(f"\nTargets (level {args.level}; forced choice, greedy exact match from memory only, MemorySession):")
    for name, ok in targets.items():
        _print(f"  {'yes' if ok else 'NO ':3}  {name}")
    _print(f"Targets: {'all met' if not failed else f'{len(failed)} of {len(targets)} NOT met'}.")

    results = write_run_results(
        output,
        levels,
        level=args.level,
        targets=targets,
        training={**training_info, "curve": trained.curve, "log_history": trained.log_history},
        markdown=f"# deltamem demo\n\nLevel {args.level}, {trained.steps} training steps "
        f"({trained.train_seconds / 60:.1f} min).\n\n{table}\n\n## All evaluated levels\n\n{overview}",
        extra={"session": session},
        started=started,
    )
    _print(
        f"\nWrote {output}/results.json, results.md, results.png, training_curve.png and the adapter ({output}/adapter)."
    )
    _print(f"Total time {results['total_seconds'] / 60:.1f} min.")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deltamem demo``; returns the exit status: 0 when every target of :func:`check_targets` is met,
    1 (after writing every result file, with the missed targets listed on stderr) when one is not."""
    args = _parse_args(list(sys.argv[1:] if argv is None else argv))
    results = run_demo(args)
    failed = failed_targets(results["targets"])
    if failed:
        print(
            f"deltamem demo: {len(failed)} target(s) not met (results in {args.output}/results.json):\n"
            + "\n".join(f"  - {name}" for name in failed),
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
