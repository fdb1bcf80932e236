"""``deltamem serve``: an OpenAI-compatible chat server in which every session keeps its own δ-mem memory.

    deltamem serve --adapter ./my-adapter --keep-last 2 --store sessions.db --api-key "$KEY"

Clients send the whole conversation each time, as with any OpenAI server, plus a session id (``session_id`` in the
body or an ``X-Session-Id`` header); the prompt holds only system + the last ``--keep-last`` messages + the new turn,
everything older lives in the session's memory (docs/serving.md).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ._args import ArgumentParser

API_KEYS_ENV = "DELTAMEM_API_KEYS"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``deltamem serve``."""
    parser = ArgumentParser(
        prog="deltamem serve",
        description="Serve a δ-mem adapter with OpenAI's chat completions API; every session keeps its own memory.",
    )
    parser.add_argument("--adapter", required=True, help="δ-mem adapter directory or Hub id")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--keep-last", type=int, default=0, help="non-system messages kept verbatim in the prompt (default 0)"
    )
    parser.add_argument("--store", default="deltamem-sessions.db", help="SQLite file of the sessions")
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        help=f"accepted Bearer key (repeatable; also {API_KEYS_ENV}, comma-separated); none = no authentication",
    )
    parser.add_argument("--model-name", default=None, help="the model id /v1/models lists (default: adapter name)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="answers generated in one batch (default 8)")
    parser.add_argument(
        "--max-wait-ms", type=float, default=50.0, help="wait for the next request to join a batch, ms (default 50)"
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt (window) in tokens")
    parser.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    parser.add_argument("--max-messages", type=int, default=512, help="most messages in one request")
    parser.add_argument("--max-open-streams", type=int, default=64, help="most streaming responses at once")
    parser.add_argument(
        "--chat-template-kwargs", type=json.loads, default=None, metavar="JSON", help="extra chat template arguments"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        default="transformers",
        help="the model engine: transformers (default) or vllm (docs/vllm.md; needs the vllm extra)",
    )
    parser.add_argument(
        "--vllm-checkpoint",
        default=None,
        metavar="PATH",
        help="--engine vllm: the deltamem export-vllm checkpoint to serve; exported there first if PATH does not "
        "exist (default: a cache folder beside --store, keyed by the adapter and base)",
    )
    parser.add_argument(
        "--vllm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--engine vllm: an argument of vllm.LLM (repeatable; VALUE is JSON, else a string), e.g. "
        "max_model_len=8192 or enforce_eager=true",
    )
    parser.add_argument("--log-level", default="info", help="log level (default info)")
    return parser


def api_keys(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The accepted keys: ``--api-key`` options and the comma-separated ``DELTAMEM_API_KEYS``."""
    environ = os.environ if environ is None else environ
    keys = list(args.api_key or [])
    keys += [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


class SetupError(Exception):
    """A setting of ``deltamem serve`` that cannot work; its message names the fix (printed as one line)."""


def vllm_options(options: list[str]) -> dict[str, Any]:
    """``--vllm-option KEY=VALUE`` options as ``vllm.LLM`` keyword arguments (VALUE parsed as JSON, else a string)."""
    out: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise SetupError(f"--vllm-option {option!r}: write KEY=VALUE, e.g. max_model_len=8192")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def vllm_checkpoint(args: argparse.Namespace) -> Path:
    """The vLLM checkpoint to serve: ``--vllm-checkpoint`` if it exists, else the adapter exported (and cached)."""
    from ..vllm.export import export_vllm_checkpoint

    if args.vllm_checkpoint is not None and Path(args.vllm_checkpoint).exists():
        return Path(args.vllm_checkpoint)
    out = Path(args.vllm_checkpoint) if args.vllm_checkpoint else _cache_dir(args)
    if not out.exists():
        try:
            export_vllm_checkpoint(args.adapter, out, args.base)
        except ValueError as err:
            raise SetupError(f"cannot serve {args.adapter} with --engine vllm: {err}") from err
    return out


def _cache_dir(args: argparse.Namespace) -> Path:
    """A folder beside the store, named by a hash of the adapter (its files, if local) and the base."""
    digest = hashlib.sha256(f"{args.adapter}\0{args.base}".encode())
    adapter = Path(args.adapter)
    if adapter.is_dir():
        digest.update(str(adapter.resolve()).encode())
        for path in sorted(adapter.glob("adapter_*")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    name = adapter.name or "adapter"
    return Path(args.store).resolve().parent / "deltamem-vllm-cache" / f"{name}-{digest.hexdigest()[:16]}"


def _engine(args: argparse.Namespace, model_id: str) -> Any:
    if args.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise SetupError(
                "--engine vllm needs vLLM in this environment: install peft-deltamem[vllm] (the CPU build) or "
                "vllm==0.32.0 (GPUs) in a separate virtualenv (docs/vllm.md)"
            )
        options = vllm_options(args.vllm_option)
        checkpoint = vllm_checkpoint(args)
        from ..vllm.engine import VllmEngine

        return VllmEngine(
            checkpoint,
            model_id=model_id,
            chat_template_kwargs=args.chat_template_kwargs,
            max_batch_size=args.max_batch_size,
            llm_kwargs=options,
        )
    from ..serving.engine import TransformersEngine
    from .chat import load_model

    model, tokenizer = load_model(args.adapter, args.base, args.device)
    return TransformersEngine(
        model,
        tokenizer,
        model_id=model_id,
        chat_template_kwargs=args.chat_template_kwargs,
        max_batch_size=args.max_batch_size,
        max_wait_s=args.max_wait_ms / 1000,
    )


def _prompt_limit(engine: Any, limit: int) -> int:
    """``--max-prompt-tokens``, lowered to what the engine can run (vLLM refuses prompts over its max_model_len)."""
    most = getattr(engine, "max_model_len", None)
    if most is not None and limit >= most:
        logging.getLogger("peft_deltamem.serving").warning(
            "--max-prompt-tokens %d is lowered to %d: the vLLM engine's max_model_len is %d (prompt + answer); "
            "raise it with --vllm-option max_model_len=N",
            limit,
            most - 1,
            most,
        )
        return most - 1
    return limit


def build_app(args: argparse.Namespace) -> Any:
    """Load the model and build the app ``args`` describe (without running it); :class:`SetupError` if it cannot."""
    from ..serving.app import ServerConfig, create_app
    from ..serving.store import SessionStore

    engine = _engine(args, args.model_name or Path(str(args.adapter).rstrip("/")).name)
    config = ServerConfig(
        keep_last=args.keep_last,
        api_keys=api_keys(args),
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        max_prompt_tokens=_prompt_limit(engine, args.max_prompt_tokens),
        max_tokens_limit=args.max_tokens_limit,
        max_open_streams=args.max_open_streams,
    )
    return create_app(engine, SessionStore(args.store), config)


def main(argv: list[str] | None = None) -> int:
    """Run ``deltamem serve`` until interrupted (SIGINT / SIGTERM finish the requests in flight first)."""
    args = build_parser().parse_args(argv)
    if args.keep_last < 0:
        print("error: --keep-last must be >= 0", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print('error: deltamem serve needs the serve extra: pip install "peft-deltamem[serve]"', file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app = build_app(args)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
