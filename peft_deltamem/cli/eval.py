"""``deltamem eval``: the memory-only protocol (docs/design.md §7) on the recall ladder or on LoCoMo.

    deltamem eval recall --level 1 --adapter outputs/adapter [--n 200] [--output results/]
    deltamem eval recall --levels 1,2,3 --adapter outputs/adapter --fact-types colour
    deltamem eval recall --levels 6,7 --adapter outputs/adapter      # the working-style family
    deltamem eval locomo --data locomo10.json --adapter outputs/adapter [--max-questions 200]

Side by side: the base model without history, with the full history in its prompt (as far as it fits), with the
BM25 top-k turns in its prompt, and the adapter answering from memory only, with its two controls (empty memory,
another conversation's memory). Without ``--adapter`` only the three base-model systems run. Prints a markdown table
and writes ``results.json`` (summaries), ``records.json`` (every answer), ``results.md`` and ``results.png`` to
``--output``.

The write pass must match training: an adapter trained with a write-only write pass (the CPU recipe's
``write_pass_reads: false``) is evaluated with ``--write-pass write-only``. ``auto`` (default) reads the setting from
``deltamem_training.json`` in the adapter directory (written by ``deltamem demo``) and otherwise reads while writing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

import peft_deltamem  # noqa: F401  (registers the DELTAMEM PEFT type)

from .._io import write_text_atomic
from ..evaluation import BASE_SYSTEMS, SYSTEMS, EvalSettings, evaluate_locomo, evaluate_recall
from ..evaluation.ladder import check_fact_types, level_fact_types
from ..evaluation.locomo import LocomoFormatError, load_locomo
from ..evaluation.report import group_table, levels_table, markdown_table, plot_results, strip_records, write_json
from ..evaluation.style import STYLE_LEVELS
from ..interop.base_models import load_base_model
from ._args import LADDER_LEVELS, ArgumentParser, parse_levels

TRAINING_INFO_FILE = "deltamem_training.json"


def _common(parser: argparse.ArgumentParser, *, max_new_tokens: int, bm25_k: int) -> None:
    parser.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="base model name or directory")
    parser.add_argument("--adapter", help="δ-mem adapter directory (without it, only the base-model systems run)")
    parser.add_argument("--output", default="eval-results", help="directory for results.json/.md/.png")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--bm25-k", type=int, default=bm25_k, help="history turns the BM25 baseline keeps")
    parser.add_argument("--max-context-tokens", type=int, help="prompt budget of full_history (default: model limit)")
    parser.add_argument(
        "--write-pass",
        choices=("auto", "read-write", "write-only"),
        default="auto",
        help="how histories are written: as the adapter was trained (see above)",
    )
    parser.add_argument("--no-generate", action="store_true", help="skip greedy generation (forced choice only)")
    parser.add_argument("--seed", type=int, default=0, help="ladder and bootstrap seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", help="torch device, e.g. cuda or cpu (default: cuda when available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The ``deltamem eval`` argument parser (subcommands ``recall`` and ``locomo``)."""
    parser = ArgumentParser(
        prog="deltamem eval", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    recall = sub.add_parser("recall", help="the recall ladder (levels 1-5) and the working-style family (6-7)")
    group = recall.add_mutually_exclusive_group(required=True)
    group.add_argument("--level", type=int, choices=LADDER_LEVELS, help="one ladder level")
    group.add_argument("--levels", type=parse_levels, help="several levels, e.g. 1,2,3")
    recall.add_argument("--n", type=int, default=200, help="conversations per level (default 200)")
    recall.add_argument("--split", default="test", choices=("train", "test"))
    recall.add_argument(
        "--fact-types",
        help="comma-separated fact types (levels 1-4, e.g. colour) or preference kinds (levels 6-7, e.g. capitals); "
        "each level uses the ones it accepts",
    )
    _common(recall, max_new_tokens=8, bm25_k=2)
    locomo = sub.add_parser("locomo", help="LoCoMo-format conversations (token F1 per category 1-4)")
    locomo.add_argument("--data", required=True, help="path of locomo10.json (not shipped: CC BY-NC)")
    locomo.add_argument("--max-questions", type=int, help="evaluate only the first N questions")
    _common(locomo, max_new_tokens=32, bm25_k=10)
    return parser


def write_pass_reads(choice: str, adapter: str | None) -> bool:
    """Resolve ``--write-pass`` to ``EvalSettings.write_pass_reads``."""
    if choice != "auto":
        return choice == "read-write"
    info = Path(adapter) / TRAINING_INFO_FILE if adapter else None
    if info is not None and info.is_file():
        return bool(json.loads(info.read_text()).get("write_pass_reads", True))
    return True


def load_models(base: str, adapter: str | None, device: str | None = None) -> tuple[Any, Any]:
    """The base model (resolved offline if need be) with the adapter loaded if given, on ``device`` (default: cuda
    when available, else cpu); eval mode."""

    model, tokenizer = load_base_model(base)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """EvalSettings from the parsed command line."""
    if args.systems:
        systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    else:
        systems = SYSTEMS if args.adapter else BASE_SYSTEMS
    return EvalSettings(
        systems=systems,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_context_tokens=args.max_context_tokens,
        bm25_k=args.bm25_k,
        generate=not args.no_generate,
        write_pass_reads=write_pass_reads(args.write_pass, args.adapter),
        seed=args.seed,
        progress=not args.no_progress,
    )


def save_report(results: dict[str, dict], output: str | Path, title: str) -> str:
    """Write ``results.json`` (summaries), ``records.json``, ``results.md`` and ``results.png``; returns the markdown."""

    output = Path(output)
    write_json({label: strip_records(r) for label, r in results.items()}, output / "results.json")
    write_json({label: r.get("records", {}) for label, r in results.items()}, output / "records.json")
    parts = []
    for label, result in results.items():
        parts += [f"### {label}", "", markdown_table(result), ""]
        for key in ("by_group", "by_preference"):
            table = group_table(result, key)
            if table:
                parts += [table, ""]
    if len(results) > 1:
        parts += ["### all", "", levels_table(results), ""]
    markdown = "\n".join(parts)
    write_text_atomic(output / "results.md", f"# {title}\n\n{markdown}")
    plot_results(results, output / "results.png", title=title)
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deltamem eval``; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = settings_from_args(args)
        if args.benchmark == "recall":
            fact_types = tuple(args.fact_types.split(",")) if args.fact_types else None
            check_fact_types(args.levels or [args.level], fact_types)
            if args.no_generate and set(args.levels or [args.level]) & set(STYLE_LEVELS):
                raise ValueError("the working-style levels (6-7) score generated answers: drop --no-generate")
    except ValueError as err:
        print(f"deltamem eval: error: {err}", file=sys.stderr)
        return 2
    if args.benchmark == "locomo":
        try:
            samples = load_locomo(args.data)
        except (FileNotFoundError, LocomoFormatError) as err:
            print(f"deltamem eval: error: {err}", file=sys.stderr)
            return 2
    model, tokenizer = load_models(args.base, args.adapter, args.device)
    if args.benchmark == "recall":
        results = {}
        for level in args.levels or [args.level]:
            results[f"L{level}"] = evaluate_recall(
                model,
                tokenizer,
                level,
                args.n,
                seed=args.seed,
                split=args.split,
                fact_types=level_fact_types(level, fact_types),
                settings=settings,
            )
        title = "Recall ladder, memory-only protocol"
    else:
        settings.forced_choice = True  # LoCoMo has no answer sets: this scores the gold answer (own-vs-other gap)
        results = {
            "LoCoMo": evaluate_locomo(model, tokenizer, samples, settings=settings, max_questions=args.max_questions)
        }
        title = "LoCoMo, memory-only protocol (token F1)"
    print(save_report(results, args.output, title))
    print(f"results written to {args.output}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
