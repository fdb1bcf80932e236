"""Memory and time to answer against history length: δ-mem's constant-size memory vs the history in the context window.

    python benchmarks/history_scaling.py [--smoke] [--out benchmarks/results/history_scaling.json] [--threads 1]
                                         [--plot docs/img/history_scaling.png]

For each history length H (default 2k, 8k and 32k tokens; random token ids) and the base model SmolLM2-135M-Instruct:

- δ-mem (``DeltaMemConfig(r=8, delta_heads=["q", "o"])``, untrained: timing and memory do not depend on the
  weights): the history is written into a ``MemoryState`` in ``--segment``-token segments, each its own
  ``torch.no_grad`` call starting at position 0 with no KV cache kept between segments; then the question
  (``--question`` tokens) is answered with ``generate(memory=mem)`` (``--answer`` new tokens, greedy), reading the
  memory;
- in context (the base model): the history is prefilled into a KV cache, then ``generate`` answers the question
  after it from that cache. The model has ``max_position_embeddings`` positions (8,192 for SmolLM2), which must hold
  history + question + answer: where the history is longer than fits, its most recent tokens that fit are kept (8k:
  all but ``question + answer`` tokens); where it is more than the window itself (32k), it is marked not possible.

Reported per (system, H): the time to take in the history (δ-mem: all segment writes; in context: the prefill), the
time to answer once the history is taken in, their sum, the size of what carries the history (memory state or KV
cache), and the peak memory: resident-set growth over the loaded model during the whole run (take in + answer),
each (system, H) in a fresh subprocess after a short warm-up run that pages in the weights, with glibc malloc set to
hand freed memory back at once (``_timing.PROBE_ENV``: otherwise the heap keeps what repeated segment calls freed,
and the resident set drifts with the number of calls, not with what is in use); ``--in-process-memory`` and
``--smoke`` measure in this process. That subprocess's peak RSS (weights included) is reported too. Times are
medians over ``--rounds`` rounds that interleave all (system, H) runs, after one untimed warm-up run of each system
at the smallest H. A PNG plot goes to ``--plot``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # run from a checkout without installing: `python benchmarks/history_scaling.py`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import _timing  # noqa: E402
from model_overhead import add_model_arg, load_base, random_ids, wrap  # noqa: E402

from peft_deltamem import MemoryState  # noqa: E402
from peft_deltamem._compat import cache_kwargs  # noqa: E402

SYSTEMS = ("deltamem", "in_context")
FULL = {"histories": (2048, 8192, 32768), "segment": 2048, "question": 32, "answer": 16}
# Smoke: the tiny model of model_overhead with a 64-position window, so the in-context limit is hit at the same
# places (H = 4 segments is truncated to fit, H = 16 segments does not fit).
SMOKE = {"histories": (16, 64, 256), "segment": 16, "question": 4, "answer": 2}
SMOKE_POSITIONS = 64
DEFAULT_PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "history_scaling.png"


class HistoryRun:
    """One (system, H) run: take the history in, then answer a question; ``__call__`` returns both times."""

    def __init__(self, system: str, model: torch.nn.Module, history: torch.Tensor, sizes: dict[str, Any]) -> None:
        self.system, self.model, self.sizes = system, model, sizes
        self.history_tokens = history.shape[1]
        self.question = random_ids(sizes["question"], model.config.vocab_size, seed=7)
        self.window = model.config.max_position_embeddings
        room = self.window - sizes["question"] - sizes["answer"]
        if system == "deltamem":
            self.possible, self.kept = True, history
        else:
            self.possible = self.history_tokens <= self.window
            self.kept = history[:, -room:] if self.possible else None
        self.history = history

    @property
    def tokens_in_context(self) -> int:
        """How many tokens the answering call attends to (history kept in the window + question)."""
        if self.system == "deltamem":
            return self.sizes["question"]
        return (self.kept.shape[1] if self.kept is not None else 0) + self.sizes["question"]

    def carrier_mb(self) -> float:
        """Size of what carries the history into the answer: the memory state, or the KV cache of the history."""
        config = self.model.config
        layers = config.num_hidden_layers
        if self.system == "deltamem":
            return layers * 8 * 8 * 4 / 2**20  # one r×r float32 state per layer (r = 8, one state head)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = layers * 2 * config.num_key_value_heads * head_dim * 4  # keys and values, float32
        return per_token * self.kept.shape[1] / 2**20

    def _generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=self.sizes["answer"],
            min_new_tokens=self.sizes["answer"],
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )

    def __call__(self) -> dict[str, float]:
        from transformers import DynamicCache

        with torch.no_grad():
            start = time.perf_counter()
            if self.system == "deltamem":
                memory = MemoryState()
                for segment in self.history.split(self.sizes["segment"], dim=1):
                    self.model(input_ids=segment, memory=memory, use_cache=False, logits_to_keep=1)
                taken_in = time.perf_counter()
                self._generate(self.question, memory=memory)
            else:
                cache = DynamicCache()
                self.model(input_ids=self.kept, use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, cache))
                taken_in = time.perf_counter()
                self._generate(torch.cat([self.kept, self.question], dim=1), **cache_kwargs(self.model, cache))
            done = time.perf_counter()
        return {"take_in_s": taken_in - start, "answer_s": done - taken_in}


def run_probe(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    """``--probe SYSTEM H``: load one system and measure the peak memory of one whole run (subprocess side)."""
    system, history_tokens = args.probe[0], int(args.probe[1])
    model = load_model(args, system)
    # A short run first: it pages in the weights (loaded lazily) and initialises the kernels, which would otherwise
    # count as the measured run's growth.
    small = {**sizes, "segment": 16}
    make_run(system, 16, model, small)()
    gc.collect()
    return _timing.peak_mb(make_run(system, history_tokens, model, sizes), process_rss=True)


def load_model(args: argparse.Namespace, system: str) -> torch.nn.Module:
    """The base model (in context) or the base model with the δ-mem adapter."""
    base = load_base(args.smoke, args.model)
    if args.smoke:
        base.config.max_position_embeddings = SMOKE_POSITIONS
    return wrap(base, "deltamem" if system == "deltamem" else "base")


def make_run(system: str, history_tokens: int, model: torch.nn.Module, sizes: dict[str, Any]) -> HistoryRun:
    """The run for one (system, H), with the same history tokens for both systems."""
    history = random_ids(history_tokens, model.config.vocab_size, seed=history_tokens)
    return HistoryRun(system, model, history, sizes)


def plot(rows: list[dict[str, Any]], path: Path, window: int, segment: int, title: str) -> Path:
    """Peak memory, take-in time and answer time against history length, δ-mem vs in context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("peak_mb", "peak memory growth (MB)"),
        ("take_in_s", "time to take in the history (s)"),
        ("answer_s", "time to answer after it (s)"),
    )
    styles = {
        "deltamem": (f"δ-mem (memory, {segment}-token segments)", "o-", "tab:blue"),
        "in_context": ("in context", "s-", "tab:red"),
    }
    histories = sorted({row["history_tokens"] for row in rows})
    for axis, (key, label) in zip(axes, panels, strict=True):
        for system, (name, style, color) in styles.items():
            points = [(r["history_tokens"], r[key]) for r in rows if r["system"] == system and r["possible"]]
            if points:
                axis.plot(*zip(*points, strict=True), style, color=color, label=name)
            impossible = [r["history_tokens"] for r in rows if r["system"] == system and not r["possible"]]
            if impossible:  # a cross on the axis where the history does not fit in the window
                cross = f"{name}: not possible (> {window} positions)"
                axis.plot(
                    impossible, [0] * len(impossible), "x", color=color, ms=11, mew=2.5, clip_on=False, label=cross
                )
        axis.set_xscale("log", base=2)
        axis.set_xticks(histories, [f"{h // 1024}k" if h >= 1024 else str(h) for h in histories])
        axis.set_xlabel("history tokens")
        axis.set_title(label, fontsize=10)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


COLUMNS = {
    "system": "system",
    "history_tokens": "history tokens",
    "possible": "possible",
    "history_in_context": "history tokens in context",
    "take_in_s": "take in history (s)",
    "answer_s": "answer (s)",
    "total_s": "total (s)",
    "carrier_mb": "memory / KV cache (MB)",
    "peak_mb": "peak growth (MB)",
    "process_peak_rss_mb": "process peak RSS (MB)",
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the markdown table, write the JSON and the plot; returns the JSON object."""
    parser = _timing.benchmark_parser(__doc__, "history_scaling")
    add_model_arg(parser)
    parser.add_argument("--histories", type=int, nargs="+", default=None, help="history lengths (default 2k 8k 32k)")
    parser.add_argument("--segment", type=int, default=None, help="tokens per δ-mem write call (default 2048)")
    parser.add_argument("--question", type=int, default=None, help="question tokens (default 32)")
    parser.add_argument("--answer", type=int, default=None, help="answer tokens generated (default 16)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2; smoke 1)")
    parser.add_argument("--plot", default=None, help=f"PNG path (default {DEFAULT_PLOT}; smoke: next to --out)")
    _timing.add_probe_args(parser, ("SYSTEM", "H"))
    args = _timing.parse_args(parser, argv)
    sizes = _timing.sizes_from_args(args, SMOKE if args.smoke else FULL)
    sizes["histories"] = tuple(sizes["histories"])
    if args.probe:
        _timing.print_probe(run_probe(args, sizes))
        return {}
    rounds = args.rounds or (1 if args.smoke else 2)
    plot_path = Path(args.plot) if args.plot else (Path(args.out).with_suffix(".png") if args.smoke else DEFAULT_PLOT)

    machine = _timing.start_report("history_scaling", args.smoke)
    load_start = _timing.load_average()
    started = time.perf_counter()
    models = {system: load_model(args, system) for system in SYSTEMS}
    window = models["in_context"].config.max_position_embeddings
    runs = {(system, h): make_run(system, h, models[system], sizes) for system in SYSTEMS for h in sizes["histories"]}
    possible = {key: run for key, run in runs.items() if run.possible}

    smallest = min(sizes["histories"])
    for system in SYSTEMS:  # warm-up, untimed
        runs[(system, smallest)]()
    calls, parts = {}, {key: [] for key in possible}
    for key, run in possible.items():

        def call(key: tuple[str, int] = key, run: HistoryRun = run) -> None:
            parts[key].append(run())

        calls[key] = call
    _timing.interleaved(calls, rounds, warmup=0)

    in_process = args.smoke or args.in_process_memory
    memory_method = "in-process" if in_process else "subprocess per (system, H)"
    rows = []
    for (system, h), run in runs.items():
        row: dict[str, Any] = {
            "system": system,
            "history_tokens": h,
            "possible": run.possible,
            "history_in_context": None if system == "deltamem" else (run.kept.shape[1] if run.possible else None),
            "tokens_attended_when_answering": run.tokens_in_context if run.possible else None,
        }
        if run.possible:
            timed = parts[(system, h)]
            for part in ("take_in_s", "answer_s"):
                row[part] = _timing.summarize([t[part] for t in timed])["median_s"]
                row[f"{part}_all"] = [t[part] for t in timed]
            row["total_s"] = row["take_in_s"] + row["answer_s"]
            row["carrier_mb"] = run.carrier_mb()
            probe = _timing.measure_peak(
                run,
                Path(__file__),
                ["--probe", system, str(h), "--model", args.model],
                in_process=in_process,
                threads=args.threads,
            )
            row["peak_mb"], row["process_peak_rss_mb"] = probe["peak_mb"], probe["process_peak_rss_mb"]
            row["memory_method"] = f"{probe['method']}, {memory_method}"
            print(f"{system} H={h}: {row['total_s']:.3g} s, peak {row['peak_mb']:.0f} MB", flush=True)
        else:
            row["note"] = f"history of {h} tokens exceeds the model's {window} positions"
        rows.append(row)

    deltamem = {row["history_tokens"]: row for row in rows if row["system"] == "deltamem"}
    longest = max(sizes["histories"])
    growth = deltamem[longest]["peak_mb"] / deltamem[smallest]["peak_mb"] - 1 if deltamem[smallest]["peak_mb"] else None
    rss_growth = None
    if deltamem[smallest]["process_peak_rss_mb"]:
        rss_growth = deltamem[longest]["process_peak_rss_mb"] / deltamem[smallest]["process_peak_rss_mb"] - 1
    summary = {
        "deltamem_peak_growth_longest_vs_smallest": growth,
        "deltamem_process_rss_longest_vs_smallest": rss_growth,
        "target": "δ-mem peak memory after the longest history within 5 % of that after the shortest",
        "met": None if growth is None else abs(growth) <= 0.05,
    }
    load_end = _timing.load_average()
    notes = [
        f"History in {sizes['segment']}-token segments for δ-mem (one call each, positions from 0, no KV kept);"
        f" question {sizes['question']} tokens, answer {sizes['answer']} generated tokens (greedy, min = max).",
        f"In context: the model's window is {window} positions; the history's most recent"
        f" {window - sizes['question'] - sizes['answer']} tokens are kept when it does not fit with question and"
        f" answer; histories longer than {window} tokens are not possible.",
        f"Times: median over {rounds} interleaved round(s), after one warm-up run per system; wall clock.",
        f"Peak: resident-set growth during the whole run, take in + answer ({memory_method})"
        + ("." if in_process else ", after a short warm-up run; glibc malloc set to return freed memory (PROBE_ENV)."),
        f"Load average (1, 5, 15 min) at start {load_start}, at end {load_end}.",
    ]
    extra = []
    if growth is not None:
        extra.append(f"δ-mem peak after {longest} vs {smallest} history tokens: {growth:+.1%} (target within ±5 %)")
    _timing.print_report(rows, COLUMNS, notes, extra)
    title = f"{'tiny random Llama (smoke)' if args.smoke else args.model}; {_timing.describe_machine(machine)}"
    result = {
        "benchmark": "history_scaling",
        "smoke": args.smoke,
        "model": "tiny random Llama (smoke)" if args.smoke else args.model,
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "wall_s": time.perf_counter() - started,
        "settings": {**sizes, "rounds": rounds, "window": window, "memory": memory_method},
        "summary": summary,
        "notes": notes,
        "rows": rows,
        "plot": str(plot(rows, plot_path, window, sizes["segment"], title)),
    }
    return _timing.save_result(args.out, result, plot_path)


if __name__ == "__main__":
    main()
