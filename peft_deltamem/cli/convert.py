"""``deltamem convert``: import an adapter in the reference implementation's format (or export one to it).

    deltamem convert declare-lab/delta-mem_qwen3_4b-instruct ./qwen3-tsw --base Qwen/Qwen3-4B-Instruct-2507
    deltamem convert ./my-adapter ./my-adapter-reference --to-reference

See :mod:`peft_deltamem.interop.convert` for what is checked; nothing is written to OUT unless everything passes.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import TextIO

import torch

from ..interop.convert import (
    ReferenceConfigWarning,
    ReferenceFormatError,
    convert_reference_adapter,
    export_reference_adapter,
)
from ._args import ArgumentParser, add_conversion_arguments


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``deltamem convert``."""
    parser = ArgumentParser(
        prog="deltamem convert",
        description="Convert a reference-format δ-mem adapter (delta_mem_config.json + delta_mem_adapter.pt) into a "
        "PEFT adapter directory, or with --to-reference the other way.",
    )
    add_conversion_arguments(
        parser,
        ("src", "reference adapter directory or Hub repo id (with --to-reference: PEFT adapter dir)"),
        base="base model name or directory: check shapes against its config and record it",
        revision="Hub revision of SRC (branch, tag or commit)",
        dtypes=("float32", "bfloat16"),
        dtype="tensor dtype of an export (the released adapters use bfloat16)",
    )
    parser.add_argument(
        "--to-reference",
        action="store_true",
        help="export SRC (a PEFT δ-mem adapter directory) to the reference format",
    )
    return parser


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``deltamem convert``; returns the exit status (0 on success, 1 when the adapter cannot be converted)."""
    args = build_parser().parse_args(argv)
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.to_reference:
                path = export_reference_adapter(args.src, args.out, dtype=getattr(torch, args.dtype))
            else:
                path = convert_reference_adapter(args.src, args.out, args.base, revision=args.revision)
    except (ReferenceFormatError, OSError, ValueError) as exc:
        print(f"deltamem convert: error: {exc}", file=err)
        return 1
    for warning in caught:
        if issubclass(warning.category, ReferenceConfigWarning):  # e.g. the note on ignored config fields
            print(f"deltamem convert: note: {warning.message}", file=err)
        else:  # anything else (from transformers, torch) goes on as a normal warning
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    print(f"wrote {path}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
