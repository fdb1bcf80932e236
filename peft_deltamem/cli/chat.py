"""``deltamem chat``: an interactive terminal chat on :class:`~peft_deltamem.chat.session.MemorySession`.

Each answer comes from a short prompt (system + the last ``--keep-last`` turns + the new message) and the δ-mem
memory, into which every turn is written. Lines starting with ``/`` are commands (``/help`` lists them).

When stdin is not a terminal the command is scriptable: it reads stdin line by line, prints no prompts or banners,
and its output is deterministic with the default greedy decoding (one streamed answer per user line, then a newline;
command results on stdout, errors on stderr; the exit status is 1 if any line failed). For example::

    printf 'My cat is called Tom.\\n/save chat1\\n' | deltamem chat --adapter ./my-adapter
    printf '/load chat1\\nWhat is my cat called?\\n/memory\\n' | deltamem chat --adapter ./my-adapter
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch
from peft import PeftConfig, PeftModel
from transformers import TextStreamer

from ..chat.session import MemorySession
from ..interop.base_models import load_pretrained, resolve_base_model
from ._args import ArgumentParser

COMMANDS = {
    "/save DIR": "save memory, transcript and adapter identity to DIR",
    "/load DIR": "load a session saved with /save (same adapter only)",
    "/reset": "forget the memory and the transcript",
    "/memory": "per-layer state norms and write-gate statistics",
    "/history": "print the transcript",
    "/help": "this list",
    "/quit": "leave (end of input works too)",
}


class _PrintStreamer(TextStreamer):
    """A ``TextStreamer`` that prints the answer (not the prompt) to a given stream."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``deltamem chat``."""
    parser = ArgumentParser(
        prog="deltamem chat",
        description="Chat with a δ-mem adapter: old turns live in the memory, not in the prompt.",
        epilog="Commands: " + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()),
    )
    parser.add_argument("--adapter", required=True, help="δ-mem adapter directory or Hub id")
    parser.add_argument(
        "--base", default=None, help="base model name or directory (default: the adapter's base_model_name_or_path)"
    )
    parser.add_argument(
        "--keep-last",
        type=int,
        default=None,
        help="previous non-system messages kept verbatim in the prompt (default 0)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy, deterministic (default)"
    )
    parser.add_argument("--system", default=None, help="system message put at the start of every prompt")
    parser.add_argument(
        "--chat-template-kwargs",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="extra chat template arguments as JSON, e.g. '{\"enable_thinking\": false}'",
    )
    parser.add_argument(
        "--write-during-generation",
        action="store_true",
        help="write prompt and answer while generating (the paper's runtime) instead of after the answer",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def load_model(adapter: str, base: str | None, device: str | None) -> tuple[Any, Any]:
    """Load ``(peft_model, tokenizer)``: the base model (resolved offline when possible) with the adapter on top."""
    config = PeftConfig.from_pretrained(adapter)
    base = base or config.base_model_name_or_path
    if not base:
        raise SystemExit(f"error: {adapter} does not name its base model; pass --base MODEL")
    model, tokenizer = load_pretrained(resolve_base_model(base))
    model = PeftModel.from_pretrained(model, adapter).eval()
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, tokenizer


def format_memory_report(session: MemorySession) -> str:
    """The text ``/memory`` prints: one line per adapted layer with state norms and write-gate statistics."""
    report = session.memory_report()
    if not report:
        return "memory: empty (nothing written yet)"

    def number(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = [f"memory: {len(report)} layers, {session.written} messages written"]
    width = max(len(name) for name in report)
    for name, entry in report.items():
        heads = " ".join(f"{x:.6f}" for x in entry["head_norms"])
        lines.append(
            f"  {name:<{width}}  norm {entry['norm']:.6f}  heads [{heads}]  writes {entry['writes']}  "
            f"β mean {number(entry['beta_mean'])} max {number(entry['beta_max'])} "
            f"last {number(entry['last_beta_mean'])}"
        )
    return "\n".join(lines)


class ChatLoop:
    """Reads lines, answers user messages and runs ``/`` commands; writes results to ``out`` and errors to ``err``."""

    def __init__(
        self,
        session: MemorySession,
        *,
        out: TextIO,
        err: TextIO,
        generate_kwargs: dict[str, Any],
        session_settings: dict[str, Any],
    ) -> None:
        self.session = session
        self.out, self.err = out, err
        self.generate_kwargs = generate_kwargs
        # Settings given on the command line win over those saved with a session.
        self.session_settings = session_settings
        self.failed = False
        self._commands: dict[str, Callable[[str], bool]] = {
            "/save": self._save,
            "/load": self._load,
            "/reset": self._reset,
            "/memory": self._memory,
            "/history": self._history,
            "/help": self._help,
            "/quit": lambda _: False,
            "/exit": lambda _: False,
        }

    def handle(self, line: str, *, interactive: bool) -> bool:
        """Process one input line; returns False when the chat should end."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return True
        if line.startswith("/"):
            name, _, argument = line.strip().partition(" ")
            command = self._commands.get(name)
            if command is None:
                return self._error(f"unknown command {name}; /help lists the commands")
            try:
                return command(argument.strip())
            except (OSError, ValueError, TypeError) as err:
                return self._error(str(err))
        if interactive:
            self.out.write("assistant> ")
            self.out.flush()
        streamer = _PrintStreamer(self.session.tokenizer, self.out)
        try:
            self.session.reply(line, streamer=streamer, **self.generate_kwargs)
        except (ValueError, RuntimeError) as err:  # e.g. a prompt longer than the model's context
            self.out.write("\n")
            return self._error(str(err))
        return True

    def _error(self, message: str) -> bool:
        self.failed = True
        print(f"error: {message}", file=self.err, flush=True)
        return True

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _save(self, directory: str) -> bool:
        if not directory:
            return self._error("usage: /save DIR")
        self.session.save(directory)
        self._print(f"saved session to {directory}")
        return True

    def _load(self, directory: str) -> bool:
        if not directory:
            return self._error("usage: /load DIR")
        session = self.session
        self.session = MemorySession.load(directory, session.model, session.tokenizer, **self.session_settings)
        self._print(f"loaded session from {directory} ({len(self.session.history)} messages)")
        return True

    def _reset(self, _: str) -> bool:
        self.session.reset()
        self._print("memory and history cleared")
        return True

    def _memory(self, _: str) -> bool:
        self._print(format_memory_report(self.session))
        return True

    def _history(self, _: str) -> bool:
        for message in self.session.history:
            self._print(f"{message['role']}: {message['content']}")
        return True

    def _help(self, _: str) -> bool:
        width = max(len(k) for k in COMMANDS)
        for name, text in COMMANDS.items():
            self._print(f"  {name:<{width}}  {text}")
        return True


def _read_lines(stdin: TextIO, out: TextIO, interactive: bool):
    if not interactive:
        yield from stdin
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - e.g. Windows
        pass
    while True:
        try:
            yield input("you> ")
        except EOFError:
            out.write("\n")
            return


def main(argv: list[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run ``deltamem chat``; returns the exit status."""
    args = build_parser().parse_args(argv)
    stdin, out, err = stdin or sys.stdin, stdout or sys.stdout, sys.stderr
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # answers of a small model may hold odd characters; never crash on them
    interactive = stdin.isatty()
    # Only settings given on the command line: they also override those saved with a session loaded by /load.
    given = {
        "keep_last": args.keep_last,
        "system": args.system,
        "chat_template_kwargs": args.chat_template_kwargs,
        "write_during_generation": args.write_during_generation or None,
    }
    settings = {k: v for k, v in given.items() if v is not None}
    generate_kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        generate_kwargs.update(do_sample=True, temperature=args.temperature)
    else:
        generate_kwargs.update(do_sample=False)

    model, tokenizer = load_model(args.adapter, args.base, args.device)
    session = MemorySession(model, tokenizer, **settings)
    loop = ChatLoop(session, out=out, err=err, generate_kwargs=generate_kwargs, session_settings=settings)
    if interactive:
        print(f"δ-mem chat with {args.adapter} — /help for commands, /quit to leave.", file=out, flush=True)
    for line in _read_lines(stdin, out, interactive):
        if not loop.handle(line, interactive=interactive):
            break
    return 1 if loop.failed and not interactive else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
