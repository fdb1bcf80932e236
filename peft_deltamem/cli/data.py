"""``deltamem data``: write training (or held-out) conversations: the recall ladder, or multi-session conversations.

    deltamem data --level 1 --n 1200 --fact-types colour --out data/ladder-l1.jsonl
    deltamem data --level 6 --n 2000 --out data/style-l6.jsonl        # working style: one preference
    deltamem data --multi-session --n 400 --out data/multisession-train.jsonl
    deltamem data --multi-session --split test --n 60 --format locomo --out data/multisession-test.json

Ladder: each line is one record of :func:`peft_deltamem.evaluation.ladder.make_ladder` (a ``messages`` conversation
plus its answer and metadata), ready as ``dataset_name`` of a recipe. Multi-session
(:mod:`peft_deltamem.training.multisession_data`): LoCoMo-shaped conversations (persona facts, dated events,
preferences, an update in a later session); ``--format jsonl`` writes one training row per question, ``--format
locomo`` the conversations as LoCoMo JSON for ``deltamem eval locomo --data``. Use the default ``--split train`` for
training data; evaluate on ``--split test``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..training.ladder_data import write_ladder_jsonl
from ..training.multisession_data import FORMATS, write_multisession
from ._args import LADDER_LEVELS, ArgumentParser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = ArgumentParser(prog="deltamem data", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--level",
        type=int,
        default=None,
        choices=LADDER_LEVELS,
        help="ladder level 1-7 (default 1; 6-7: working style)",
    )
    parser.add_argument("--n", type=int, default=2000, help="number of conversations (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument(
        "--fact-types",
        default=None,
        help="comma-separated fact types, e.g. colour, or preference kinds at levels 6-7, e.g. capitals (default: all)",
    )
    multi = parser.add_argument_group("multi-session conversations (LoCoMo's shape)")
    multi.add_argument("--multi-session", action="store_true", help="write multi-session conversations, not the ladder")
    multi.add_argument("--sessions", type=int, default=None, help="sessions per conversation, 2-10 (default 4)")
    multi.add_argument(
        "--open-values", action="store_true", help="answers from per-split disjoint pools (test answers never trained)"
    )
    multi.add_argument("--format", choices=FORMATS, default=None, help="jsonl: training rows; locomo: LoCoMo JSON")
    parser.add_argument("--out", required=True, help="the file to write")
    args = parser.parse_args(argv)
    if args.multi_session:
        if args.level is not None or args.fact_types is not None:
            parser.error("--level and --fact-types are ladder options; drop them with --multi-session")
        try:
            count = write_multisession(
                args.out,
                args.n,
                seed=args.seed,
                split=args.split,
                sessions=args.sessions if args.sessions is not None else 4,
                open_values=args.open_values,
                fmt=args.format or "jsonl",
            )
        except ValueError as err:
            parser.error(str(err))
        what = "rows (one per question)" if args.format in (None, "jsonl") else "conversations (LoCoMo JSON)"
        print(f"wrote {count} multi-session {args.split} {what} to {args.out}")
        return 0
    if args.sessions is not None or args.open_values or args.format is not None:
        parser.error("--sessions, --open-values and --format apply to --multi-session only")
    level = args.level if args.level is not None else 1
    fact_types = args.fact_types.split(",") if args.fact_types else None
    try:
        count = write_ladder_jsonl(args.out, level, args.n, seed=args.seed, split=args.split, fact_types=fact_types)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {count} L{level} {args.split} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
