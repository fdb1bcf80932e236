"""``deltamem``: the command-line entry point. ``deltamem SUBCOMMAND --help`` describes each subcommand.

One module per subcommand (``cli/<name>.py``, dashes in the name as underscores, with a ``main(argv) -> int``),
registered in :data:`COMMANDS` as ``"module:function"``; the module is imported only when its subcommand runs, so
``deltamem --help`` stays fast.
Options are spelled with dashes (``--max-new-tokens``); the underscore spelling is accepted too (``cli/_args.py``).
A new command is a new module here plus one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "chat": "peft_deltamem.cli.chat:main",
    "climb": "peft_deltamem.cli.climb:main",
    "convert": "peft_deltamem.cli.convert:main",
    "data": "peft_deltamem.cli.data:main",
    "demo": "peft_deltamem.cli.demo:main",
    "eval": "peft_deltamem.cli.eval:main",
    "export-vllm": "peft_deltamem.cli.export_vllm:main",
    "serve": "peft_deltamem.cli.serve:main",
    "train": "peft_deltamem.cli.train:main",
}


def _usage() -> str:
    return "usage: deltamem {" + ",".join(COMMANDS) + "} [ARGS...]   (deltamem SUBCOMMAND --help for details)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default: ``sys.argv[1:]``) to its subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    target = COMMANDS.get(name)
    if target is None:
        print(f"deltamem: unknown subcommand {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
