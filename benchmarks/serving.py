"""``deltamem serve`` measured: batching throughput, per-turn cost against resending the history, the session store.

    python benchmarks/serving.py [--smoke] [--out benchmarks/results/serving.json] [--threads N]
        [--parts batching per-turn store]

The app runs under uvicorn in this process on 127.0.0.1 (the real HTTP path), the model is SmolLM2-135M-Instruct with
an untrained δ-mem adapter (r 8, heads q and o: timing does not depend on the weights; ``--smoke``: a tiny random
Llama). Three measurements:

1. **Batching.** ``--sessions`` sessions each send ``--turns`` requests (a growing conversation, ``--max-tokens``
   greedy tokens) to two servers, turn by turn in alternating order: to one one request at a time, to the other with
   one client thread per session. Reported: completion tokens per second, p50 / p95 request latency, the ratio, and
   the batch sizes the engines formed (generation and writes).
2. **Per-turn cost.** At turn T (``--per-turn``) of a synthetic conversation: δ-mem (``keep_last`` 2; the session
   already holds turns 1..T-1, so the request writes the turn that left the window and answers) against a server that
   resends the whole history (``keep_last`` larger than the conversation: nothing is written, everything is in the
   prompt). Reported: prompt tokens and request time.
3. **Store.** Bytes of one snapshot and the latency of committing one write group with it (SQLite, WAL,
   ``synchronous=FULL``), median over ``--commits`` commits.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import benchmark_parser, parse_args, print_report, save_result, start_report  # noqa: E402


def load(smoke: bool) -> tuple[Any, Any]:
    """The δ-mem model and tokenizer."""
    from peft import get_peft_model

    from peft_deltamem import DeltaMemConfig

    if smoke:
        from tests.helpers.chat_fixtures import smollm2_tokenizer
        from tests.helpers.tiny_models import tiny_model_for

        tokenizer = smollm2_tokenizer()
        base = tiny_model_for(tokenizer)
    else:
        from peft_deltamem.interop.base_models import load_base_model

        base, tokenizer = load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", r=8, delta_heads=["q", "o"]))
    return model.requires_grad_(False).eval(), tokenizer


class Server:
    """The app under uvicorn in a thread on 127.0.0.1 (a context manager)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        store: Path,
        keep_last: int,
        max_batch_size: int = 8,
        max_wait_ms: float = 50.0,
    ) -> None:
        import uvicorn

        from peft_deltamem.serving.app import ServerConfig, create_app
        from peft_deltamem.serving.engine import TransformersEngine
        from peft_deltamem.serving.store import SessionStore  # noqa: I001

        self.engine = TransformersEngine(
            model, tokenizer, model_id="bench", max_batch_size=max_batch_size, max_wait_s=max_wait_ms / 1000
        )
        config = ServerConfig(keep_last=keep_last, max_prompt_tokens=1 << 20, max_messages=1 << 20)
        config.max_body_bytes = 1 << 26
        app = create_app(self.engine, SessionStore(store), config)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def ask(self, messages: list[dict], session: str | None, max_tokens: int) -> tuple[dict, float]:
        import httpx

        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "session_id": session}
        started = time.perf_counter()
        response = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json(), time.perf_counter() - started


def turn(i: int) -> list[dict]:
    """Turn ``i`` of the synthetic conversation (about 15 tokens per message)."""
    return [
        {"role": "user", "content": f"Note number {i}: the meeting in room {i % 7} moves to {i % 12 + 1} o'clock."},
        {"role": "assistant", "content": f"Noted: room {i % 7} at {i % 12 + 1} o'clock, note {i}."},
    ]


def conversation(turns: int, session: int = 0) -> list[dict]:
    messages = [m for i in range(turns - 1) for m in turn(i + 100 * session)]
    return messages + [{"role": "user", "content": f"What did note {turns // 2} say?"}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def batching(
    model: Any, tokenizer: Any, tmp: Path, sessions: int, turns: int, max_tokens: int, max_wait_ms: float
) -> list[dict]:
    """One server per mode, interleaved turn by turn (the order alternating) so that load changes hit both alike."""
    modes = ("one at a time", "concurrent")
    with (
        Server(model, tokenizer, tmp / "batch-one.db", keep_last=2, max_wait_ms=max_wait_ms) as alone,
        Server(model, tokenizer, tmp / "batch-all.db", keep_last=2, max_wait_ms=max_wait_ms) as together,
    ):
        servers = dict(zip(modes, (alone, together), strict=True))
        stats: dict[str, dict[str, Any]] = {m: {"latencies": [], "tokens": 0, "elapsed": 0.0} for m in modes}
        for server in servers.values():
            server.ask(conversation(1), None, max_tokens)  # warm-up
            server.engine.batches.clear()
            server.engine.write_batches.clear()
        for t in range(1, turns + 1):
            for mode in modes if t % 2 else modes[::-1]:
                server, lock = servers[mode], threading.Lock()

                def ask(session: int, server: Server = server, mode: str = mode, lock: Any = lock, t: int = t) -> None:
                    body, seconds = server.ask(conversation(t, session), f"s{session}", max_tokens)
                    with lock:
                        stats[mode]["latencies"].append(seconds)
                        stats[mode]["tokens"] += body["usage"]["completion_tokens"]

                started = time.perf_counter()
                if mode == "concurrent":
                    with cf.ThreadPoolExecutor(sessions) as pool:
                        list(pool.map(ask, range(sessions)))
                else:
                    for session in range(sessions):
                        ask(session)
                stats[mode]["elapsed"] += time.perf_counter() - started
        rows = []
        for mode, server in servers.items():
            batches, writes = list(server.engine.batches), list(server.engine.write_batches)
            rows.append(
                {
                    "measure": f"{sessions} sessions × {turns} turns, {mode}",
                    "tokens_per_s": stats[mode]["tokens"] / stats[mode]["elapsed"],
                    "p50_s": statistics.median(stats[mode]["latencies"]),
                    "p95_s": percentile(stats[mode]["latencies"], 0.95),
                    "mean_batch": sum(batches) / max(len(batches), 1),
                    "mean_write_batch": sum(writes) / max(len(writes), 1),
                }
            )
    rows.append(
        {
            "measure": "throughput ratio (concurrent / one at a time)",
            "tokens_per_s": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
        }
    )
    return rows


def per_turn(model: Any, tokenizer: Any, tmp: Path, points: list[int], max_tokens: int) -> list[dict]:
    rows = []
    for system, keep_last in (("δ-mem (keep_last 2)", 2), ("resend the history", 1 << 20)):
        with Server(model, tokenizer, tmp / f"turn-{keep_last}.db", keep_last=keep_last) as server:
            server.ask(conversation(1), None, max_tokens)  # warm-up
            for t in points:
                session = f"{system}-{t}"
                if keep_last == 2:
                    server.ask(conversation(t - 1), session, max_tokens)  # the session holds turns 1..T-1
                body, seconds = server.ask(conversation(t), session, max_tokens)
                rows.append(
                    {
                        "measure": f"turn {t}: {system}",
                        "prompt_tokens": body["usage"]["prompt_tokens"],
                        "time_s": seconds,
                    }
                )
    return rows


def store_cost(model: Any, tokenizer: Any, tmp: Path, commits: int) -> list[dict]:
    from peft_deltamem import MemoryState
    from peft_deltamem.serving.store import SessionStore, WrittenGroup, memory_to_bytes
    from peft_deltamem.serving.window import write_messages

    memory = MemoryState()
    write_messages(model, tokenizer, memory, turn(0))
    snapshot = memory_to_bytes(memory)
    store = SessionStore(tmp / "store.db")
    times = []
    for i in range(commits):
        started = time.perf_counter()
        store.commit("s", "", i, [WrittenGroup(f"h{i}", turn(i), 30, snapshot)])
        times.append(time.perf_counter() - started)
    store.close()
    serialize = []
    for _ in range(commits):
        started = time.perf_counter()
        memory_to_bytes(memory)
        serialize.append(time.perf_counter() - started)
    return [
        {"measure": "snapshot bytes per write group", "bytes": len(snapshot)},
        {"measure": "commit one group + snapshot (median)", "time_s": statistics.median(times)},
        {"measure": "serialise one snapshot (median)", "time_s": statistics.median(serialize)},
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser(__doc__, "serving")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=50.0, help="the engines' batch wait (deltamem serve's)")
    parser.add_argument("--per-turn", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--commits", type=int, default=50)
    parser.add_argument(
        "--parts", nargs="+", choices=["batching", "per-turn", "store"], default=["batching", "per-turn", "store"]
    )
    args = parse_args(parser, argv)
    if args.smoke:
        args.sessions, args.turns, args.max_tokens, args.per_turn, args.commits = 3, 2, 4, [2, 4], 5
    machine = start_report("deltamem serve", args.smoke)
    model, tokenizer = load(args.smoke)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        rows = []
        if "batching" in args.parts:
            rows += batching(model, tokenizer, Path(tmp), args.sessions, args.turns, args.max_tokens, args.max_wait_ms)
        if "per-turn" in args.parts:
            rows += per_turn(model, tokenizer, Path(tmp), args.per_turn, args.max_tokens)
        if "store" in args.parts:
            rows += store_cost(model, tokenizer, Path(tmp), args.commits)
    columns = {
        "measure": "measure",
        "tokens_per_s": "tokens/s (or ratio)",
        "p50_s": "p50 s",
        "p95_s": "p95 s",
        "mean_batch": "mean batch",
        "mean_write_batch": "mean write batch",
        "prompt_tokens": "prompt tokens",
        "time_s": "time s",
        "bytes": "bytes",
    }
    notes = [
        "model: " + ("tiny random Llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct + untrained δ-mem r 8 q,o"),
        f"{args.max_tokens} greedy tokens per answer at most (an answer may end earlier at its end token)",
    ]
    print_report(rows, columns, notes)
    settings = {
        k: getattr(args, k) for k in ("sessions", "turns", "max_tokens", "max_wait_ms", "per_turn", "commits", "parts")
    }
    result = {"benchmark": "serving", "smoke": args.smoke, "machine": machine, "settings": settings, "rows": rows}
    return save_result(args.out, result)


if __name__ == "__main__":
    main()
