"""Recipes: a YAML file plus ``--key value`` overrides parsed into TRL's arguments and a :class:`DeltaMemConfig`.

The published recipes ship with the package (``peft_deltamem/training/recipes/``, package data). A recipe argument
that is not an existing file but names one of them, ``recipes/<model>/<variant>.yaml`` as the docs write it, is that
bundled recipe (:func:`recipe_file`), so the documented commands work from a checkout and from an installed wheel.

``deltamem train`` (:mod:`peft_deltamem.cli.train`) runs them; :func:`parse_recipe` and :func:`run` are the library
side. The fields a recipe may set, and how, are described in :mod:`peft_deltamem.cli.train`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser

from .._compat import training_argument_names
from ..config import DeltaMemConfig
from ..interop.base_models import resolve_base_model
from .data import load_conversations
from .trainer import DeltaMemSFTConfig, DeltaMemSFTTrainer

# PEFT bookkeeping fields that a recipe does not set.
_ADAPTER_FIELDS = frozenset(f.name for f in dataclasses.fields(DeltaMemConfig) if f.init) - {"peft_type"}


class RecipeError(ValueError):
    """A recipe (file or command line) that cannot be used; the message is one line naming the source and field."""


@dataclass
class Recipe:
    """A parsed recipe: the TRL script, training and model arguments plus the adapter configuration."""

    script: Any  # trl.ScriptArguments
    training: Any  # DeltaMemSFTConfig
    model: Any  # trl.ModelConfig
    adapter: DeltaMemConfig
    source: str


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: The recipes that ship with the package.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def recipe_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a file, else the bundled recipe it names (``recipes/qwen3-8b/msw.yaml``, ``qwen3-8b/msw``).

    A name that matches neither is returned unchanged (reading it then reports that the file does not exist).
    """
    given = Path(path)
    if given.is_file():
        return given
    name = given.as_posix().removeprefix("recipes/")
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return given


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except FileNotFoundError as err:
        raise RecipeError(f"{path}: no such recipe file") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of field: value")
    return values


def _split_adapter_args(args: list[str], flat: set[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--deltamem.KEY VALUE`` and flat ``--KEY VALUE`` adapter overrides out of the command line."""
    rest, adapter = [], {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_value, value = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        key = name[len("deltamem.") :] if name.startswith("deltamem.") else name if name in flat else None
        if key is None:
            rest.append(arg)
            i += 1
            continue
        if not has_value:
            if i + 1 >= len(args):
                raise RecipeError(f"command line: {arg} needs a value")
            value, i = args[i + 1], i + 1
        if key not in _ADAPTER_FIELDS:
            raise RecipeError(f"command line: unknown adapter field {key!r}{_suggest(key, set(_ADAPTER_FIELDS))}")
        adapter[key] = yaml.safe_load(value)
        i += 1
    return rest, adapter


def _parser():
    class _Parser(TrlParser):
        def error(self, message: str):  # argparse prints the usage and exits; one line is clearer
            raise RecipeError(message)

    return _Parser((ScriptArguments, DeltaMemSFTConfig, ModelConfig))


def _argparse_error(message: str, args: list[str], source: str) -> RecipeError:
    """argparse's "argument --lr/--l-r: invalid ..." as "SOURCE: lr: invalid ...", SOURCE being where the value came from."""
    match = re.match(r"argument (\S+): (.*)", message)
    if match is None:
        return RecipeError(f"{source}: {message}")
    options = match.group(1).split("/")
    where = "command line" if any(a.split("=")[0] in options for a in args) else source
    return RecipeError(f"{where}: {options[0].lstrip('-')}: {match.group(2)}")


def _adapter_config(values: dict[str, Any], source: str, from_cli: set[str]) -> DeltaMemConfig:
    unknown = sorted(set(values) - _ADAPTER_FIELDS)
    if unknown:
        raise RecipeError(
            f"{source}: deltamem: unknown field {unknown[0]!r}{_suggest(unknown[0], set(_ADAPTER_FIELDS))}"
        )
    try:
        return DeltaMemConfig(**{"task_type": "CAUSAL_LM", **values})
    except (TypeError, ValueError) as err:
        field = re.search(r"DeltaMemConfig\.(\w+)", str(err))
        where = "command line" if field is not None and field.group(1) in from_cli else source
        raise RecipeError(f"{where}: deltamem: {_one_line(err)}") from err


def parse_recipe(argv: Sequence[str]) -> Recipe:
    """Parse ``[CONFIG.yaml | --config CONFIG.yaml] [--key value ...]`` into a :class:`Recipe`.

    Raises:
        RecipeError: one line naming the file (or the command line) and the field at fault.
    """
    args = list(argv)
    path = None
    if "--config" in args:
        at = args.index("--config")
        if at + 1 >= len(args):
            raise RecipeError("command line: --config needs a file")
        path = args[at + 1]
        del args[at : at + 2]
    elif args and not args[0].startswith("-"):
        path = args.pop(0)
    source = path or "command line"
    if path:
        path = str(recipe_file(path))
    values = _read_yaml(path) if path else {}
    env = values.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"{source}: 'env' must be a mapping of variable: value")
    os.environ.update({str(k): str(v) for k, v in env.items()})
    block = values.pop("deltamem", None) or {}
    if not isinstance(block, dict):
        raise RecipeError(f"{source}: 'deltamem' must be a mapping of DeltaMemConfig fields")

    parser = _parser()
    taken = {action.dest for action in parser._actions}
    flat = set(_ADAPTER_FIELDS) - taken
    adapter = dict(block)
    for key in [k for k in values if k in flat]:
        if key in block:
            raise RecipeError(f"{source}: {key!r} is set both flat and in the 'deltamem' block")
        adapter[key] = values.pop(key)
    args, cli_adapter = _split_adapter_args(args, flat)
    adapter.update(cli_adapter)

    try:
        values = training_argument_names(values)
    except ValueError as err:
        raise RecipeError(f"{source}: {err}") from None
    unknown = parser.set_defaults_with_config(**values)
    if unknown:
        key = unknown[0][2:]
        raise RecipeError(f"{source}: unknown field {key!r}{_suggest(key, taken | flat)}")
    try:
        script, training, model = parser.parse_args_into_dataclasses(args=args)
    except RecipeError as err:
        raise _argparse_error(str(err), args, source) from err
    except (TypeError, ValueError) as err:
        message = _one_line(err)
        if "not used by the HfArgumentParser" in message:
            message = f"unknown arguments {message.split(':', 1)[1].strip()}"
            source = "command line"
        raise RecipeError(f"{source}: {message}") from err
    return Recipe(script, training, model, _adapter_config(adapter, source, set(cli_adapter)), source)


def _load_data(recipe: Recipe, split: str):
    name = recipe.script.dataset_name
    if not name:
        raise RecipeError(
            f"{recipe.source}: dataset_name is required (a .json/.jsonl file of {{'messages': [...]}} rows, a saved "
            "dataset directory or a datasets name)"
        )
    return load_conversations(
        name, split=split, name=recipe.script.dataset_config, invalid_rows=recipe.training.invalid_rows
    )


def run(recipe: Recipe):
    """Train as the recipe says and save the adapter to ``output_dir``; returns the trainer."""
    args, model_args = recipe.training, recipe.model
    if not model_args.model_name_or_path:
        raise RecipeError(f"{recipe.source}: model_name_or_path is required")
    with PartialState().main_process_first():  # a first-time download or conversion happens once
        model_path = resolve_base_model(model_args.model_name_or_path)
    init = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    args.model_init_kwargs = {**{k: v for k, v in init.items() if v is not None}, **(args.model_init_kwargs or {})}
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=model_args.model_revision, trust_remote_code=args.trust_remote_code
    )
    train_dataset = _load_data(recipe, recipe.script.dataset_train_split)
    eval_dataset = _load_data(recipe, recipe.script.dataset_test_split) if args.eval_strategy != "no" else None
    trainer = DeltaMemSFTTrainer(
        model=model_path,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=recipe.adapter,
    )
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the last checkpoint in output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    return trainer
