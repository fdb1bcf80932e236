"""Recall-ladder training data as JSON Lines (``deltamem data --level 1 --n 2000 --fact-types colour --out
data/ladder-l1.jsonl`` writes it from a terminal).

Each line is one record of :func:`peft_deltamem.evaluation.ladder.make_ladder` (a ``messages`` conversation plus its
answer and metadata), ready as ``dataset_name`` of a recipe (``recipes/smollm2-135m/tsw-cpu.yaml``). Use the default
``--split train`` for training data; evaluate on ``--split test``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..evaluation.ladder import make_ladder
from ..evaluation.report import write_jsonl


def write_ladder_jsonl(
    path: str | Path,
    level: int,
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    fact_types: Sequence[str] | None = None,
) -> int:
    """Write ``n`` ladder examples of ``level`` (only ``fact_types``, if given) to ``path`` (atomically); returns the
    number of lines written."""
    return write_jsonl(make_ladder(level, n, seed=seed, split=split, fact_types=fact_types), path)


if __name__ == "__main__":  # the old command, python -m peft_deltamem.training.ladder_data, for one more release
    from .._deprecated import moved

    moved(__name__, "peft_deltamem.cli.data")
