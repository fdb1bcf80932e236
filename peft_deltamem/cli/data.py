"""``deltamem data``: write recall-ladder conversations as JSON Lines, training data for a recipe.

    deltamem data --level 1 --n 1200 --fact-types colour --out data/ladder-l1.jsonl
    deltamem data --level 6 --n 2000 --out data/style-l6.jsonl        # working style: one preference

Each line is one record of :func:`peft_deltamem.evaluation.ladder.make_ladder` (a ``messages`` conversation plus its
answer and metadata), ready as ``dataset_name`` of a recipe. Use the default ``--split train`` for training data;
evaluate on ``--split test``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..training.ladder_data import write_ladder_jsonl
from ._args import LADDER_LEVELS, ArgumentParser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = ArgumentParser(prog="deltamem data", description=__doc__)
    parser.add_argument(
        "--level", type=int, default=1, choices=LADDER_LEVELS, help="ladder level 1-7 (default 1; 6-7: working style)"
    )
    parser.add_argument("--n", type=int, default=2000, help="number of conversations (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument(
        "--fact-types",
        default=None,
        help="comma-separated fact types, e.g. colour, or preference kinds at levels 6-7, e.g. capitals (default: all)",
    )
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    fact_types = args.fact_types.split(",") if args.fact_types else None
    try:
        count = write_ladder_jsonl(
            args.out, args.level, args.n, seed=args.seed, split=args.split, fact_types=fact_types
        )
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {count} L{args.level} {args.split} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
