"""Train a δ-mem adapter from a recipe: ``deltamem train CONFIG.yaml [--key value ...]``.

Also ``python -m peft_deltamem.cli.train CONFIG.yaml ...`` and, for several processes,
``accelerate launch [--config_file peft_deltamem/training/recipes/accelerate/ddp.yaml] -m peft_deltamem.cli.train CONFIG.yaml ...``.

The YAML file is read with TRL's argument parser, so its flat fields are those of TRL's ``ScriptArguments``
(``dataset_name``, ``dataset_config``, ``dataset_train_split``, ``dataset_test_split``), of
:class:`~peft_deltamem.training.DeltaMemSFTConfig` (every ``SFTConfig`` / ``TrainingArguments`` field plus the episode
settings) and of TRL's ``ModelConfig`` (``model_name_or_path``, ``dtype``, ``attn_implementation``, ...; its LoRA
fields are ignored). The adapter is a ``deltamem:`` block of :class:`~peft_deltamem.DeltaMemConfig` fields, or the
same fields flat when their names are not taken. An ``env:`` block sets environment variables.

``--key value`` on the command line overrides any of them; adapter fields as ``--deltamem.r 16`` (or ``--r 16``), with
YAML syntax for the value (``--deltamem.delta_heads "[q, o]"``). ``dataset_name`` is a ``.json`` / ``.jsonl`` file of
``{"messages": [...]}`` rows, a directory written by ``Dataset.save_to_disk`` or a ``datasets`` name. A wrong field
or value, or malformed data, ends with one error line naming the file, the field or the row (exit status 2).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..interop.base_models import ModelResolutionError
from ..training.data import DataError
from ..training.recipe import Recipe, RecipeError, parse_recipe, run

__all__ = ["Recipe", "RecipeError", "main", "parse_recipe", "run"]

USAGE = "usage: deltamem train CONFIG.yaml [--key value ...]   (python -m peft_deltamem.cli.train CONFIG.yaml ...)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deltamem train``; returns the exit status (2 with one error line for a bad recipe or data)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.split(chr(10), 2)[2].strip()}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        run(parse_recipe(argv))
    except (RecipeError, DataError, ModelResolutionError) as err:
        print(f"deltamem train: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
