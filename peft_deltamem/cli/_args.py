"""What every ``deltamem`` command shares: one flag style (``--max-new-tokens``) with the other spelling as an alias."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose long options are written with dashes and also accept underscores.

    ``add_argument("--max-new-tokens")`` accepts ``--max_new_tokens`` too (the spelling of ``deltamem train``, whose
    recipe fields are Python names); the help lists the dashed spelling only. Subcommand parsers do the same.
    """

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._dashed(arg) for arg in args], namespace)

    def _dashed(self, arg: str) -> str:
        """``--max_new_tokens[=v]`` as ``--max-new-tokens[=v]`` when that is one of this parser's options."""
        if not arg.startswith("--") or "_" not in arg:
            return arg
        name, sep, value = arg.partition("=")
        dashed = "--" + name[2:].replace("_", "-")
        return dashed + sep + value if dashed in self._option_string_actions else arg


def add_conversion_arguments(
    parser: argparse.ArgumentParser,
    source: tuple[str, str],
    base: str,
    revision: str,
    dtypes: tuple[str, ...],
    dtype: str,
) -> None:
    """The arguments of a command that turns an adapter into a directory (``convert``, ``export-vllm``): the source
    positional (name, help), ``out``, ``--base`` and ``--revision`` (their help), ``--dtype`` (choices, the first is
    the default; its help)."""
    parser.add_argument(source[0], help=source[1])
    parser.add_argument("out", help="output directory (written atomically; replaced only on success)")
    parser.add_argument("--base", default=None, help=base)
    parser.add_argument("--revision", default=None, help=revision)
    parser.add_argument("--dtype", choices=dtypes, default=dtypes[0], help=dtype)


LADDER_LEVELS = range(1, 8)
"""The ladder's levels: recall 1-5 and the working-style family 6-7 (docs/evaluation.md)."""


def parse_levels(text: str) -> list[int]:
    """Ladder levels from ``"1,2,3"`` (an ``argparse`` type: a bad value is a usage error)."""
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated integers 1-7, got {text!r}") from None
    if not levels or any(level not in LADDER_LEVELS for level in levels):
        raise argparse.ArgumentTypeError(f"levels must be in 1-7, got {text!r}")
    return levels
