"""What δ-mem costs on top of the base model and of LoRA: training step, prefill, decode, generate, peak memory.

    python benchmarks/model_overhead.py [--smoke] [--out benchmarks/results/model_overhead.json] [--threads 1]

Three systems built from the same base model (SmolLM2-135M-Instruct via ``load_base_model``, offline; ``--smoke``
uses a tiny random Llama):

- ``base``: the model itself;
- ``lora``: PEFT LoRA, r 8, alpha 16, on ``q_proj`` and ``o_proj`` of every layer, no dropout;
- ``deltamem``: δ-mem, ``DeltaMemConfig(r=8, delta_heads=["q", "o"])`` on every attention layer (the defaults:
  token writes, one state head, chunked scan for T > 1).

Measurements (batch 1):

- training step: forward + backward of the causal-LM loss on ``--train-tokens`` tokens, then ``zero_grad``. δ-mem
  runs a normal forward with ``memory=MemoryState()``, so the memory writes run with gradients. The base model is
  frozen: its backward is taken w.r.t. the input embeddings, i.e. the backward through the whole network that every
  adapter pays (no weight gradients);
- prefill: one ``torch.no_grad`` forward over ``--prefill-tokens`` tokens that fills a KV cache (``logits_to_keep=1``,
  as ``generate`` does), δ-mem with a fresh memory that it writes;
- decode: after a ``--decode-prompt``-token prefill, ``--decode-steps`` greedy one-token steps with the KV cache
  (δ-mem reads and writes its memory every step); per-token latency = median over all timed steps;
- generate: end-to-end ``model.generate`` of ``--decode-steps`` new tokens after the same prompt (δ-mem with
  ``memory=MemoryState()``, which also writes the last token and keeps the caller's memory);
- peak memory: resident-set growth during one call (``_timing.peak_memory``), each (system, phase) in a fresh
  subprocess that loads only that system, so no earlier call's freed-but-cached memory hides the peak
  (``--in-process-memory``, and ``--smoke``, measure in this process instead), after one small call of the same
  kind that pages in the weights, with glibc malloc set to hand freed memory back at once (``_timing.PROBE_ENV``)
  so that the resident set follows the memory in use; the subprocess's peak RSS (weights included) is reported too.

Timings are interleaved so that load on a shared machine hits every system alike: each round calls base, LoRA and
δ-mem once in turn (decode interleaves single steps), and each system's time is the median over rounds. Ratios are
taken between medians of the same run. The JSON records the load average at start and end.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # run from a checkout without installing: `python benchmarks/model_overhead.py`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import _timing  # noqa: E402

from peft_deltamem import DeltaMemConfig, MemoryState  # noqa: E402
from peft_deltamem._compat import cache_kwargs  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SYSTEMS = ("base", "lora", "deltamem")
PHASES = ("train", "prefill", "decode")
MEASUREMENTS = ("train", "prefill", "decode", "generate", "memory")
# A tiny Llama for --smoke (and the tests): same code paths, a few ms per call.
SMOKE_MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FULL = {"train_tokens": 2048, "prefill_tokens": 2048, "decode_prompt": 512, "decode_steps": 64}
SMOKE = {"train_tokens": 48, "prefill_tokens": 48, "decode_prompt": 16, "decode_steps": 4}
WARMUP_SIZES = {"train_tokens": 16, "prefill_tokens": 16, "decode_prompt": 8, "decode_steps": 2}
TARGETS = {  # δ-mem / reference, from the issue (benchmarks, not tests)
    "train": ("lora", 1.30),
    "prefill": ("base", 1.15),
    "decode": ("base", 1.10),
}


# ----- the models and their inputs, shared with history_scaling.py (timing helpers: _timing.py) --------------------
def add_model_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--model``, the base model that :func:`load_base` loads (name or local directory)."""
    parser.add_argument("--model", default=MODEL, help="base model name or local directory (default: %(default)s)")
    return parser


def load_base(smoke: bool, model: str = MODEL) -> torch.nn.Module:
    """The base causal LM in eval mode: the real SmolLM2 (offline, cached conversion) or, for smoke, a tiny Llama."""
    if smoke:
        import transformers as tf

        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMOKE_MODEL)).eval()
    from peft_deltamem.interop.base_models import load_base_model

    base, _ = load_base_model(model)
    return base.eval()


def wrap(base: torch.nn.Module, system: str) -> torch.nn.Module:
    """``base`` itself (frozen), or ``base`` wrapped (in place) with the LoRA or δ-mem adapter of this benchmark."""
    from peft import LoraConfig, get_peft_model

    if system == "base":
        return base.requires_grad_(False)  # frozen, like the backbone under an adapter
    if system == "lora":
        config = LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], lora_dropout=0.0
        )
    elif system == "deltamem":
        config = DeltaMemConfig(task_type="CAUSAL_LM", r=8, delta_heads=["q", "o"])
    else:
        raise ValueError(f"unknown system {system!r}")
    return get_peft_model(base, config).eval()


def build_systems(base: torch.nn.Module, systems: Sequence[str] = SYSTEMS) -> dict[str, torch.nn.Module]:
    """One model per system; the adapters wrap deep copies, so ``base`` stays the plain model."""
    return {name: wrap(base if name == "base" else copy.deepcopy(base), name) for name in systems}


def memory_kwargs(system: str) -> dict[str, Any]:
    """A fresh, empty memory for δ-mem calls; nothing for the others."""
    return {"memory": MemoryState()} if system == "deltamem" else {}


def random_ids(length: int, vocab: int, seed: int, batch: int = 1) -> torch.Tensor:
    """[batch, length] token ids that avoid the first 3 (special) ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


# ----- the measured calls ------------------------------------------------------------------------------------------
def train_step(system: str, model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of the LM loss on ``ids``, then zero_grad (see the module docstring for the base model)."""

    def step() -> None:
        if system == "base":
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            out = model(inputs_embeds=embeds, labels=ids, use_cache=False)
        else:
            out = model(input_ids=ids, labels=ids, use_cache=False, **memory_kwargs(system))
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def prefill(system: str, model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """A no-grad forward that fills a fresh KV cache (and, for δ-mem, writes a fresh memory)."""

    def call() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **memory_kwargs(system))

    return call


class Decoder:
    """Greedy decoding one step at a time with a KV cache (and, for δ-mem, a memory read and written every step)."""

    def __init__(self, system: str, model: torch.nn.Module, prompt: torch.Tensor, read_only: bool = False) -> None:
        self.system, self.model, self.prompt = system, model, prompt
        # read_only: the decode steps only read the memory the prefill wrote (as the server decodes)
        self.step_kwargs = {"memory_write": False} if read_only and system == "deltamem" else {}

    def start(self) -> None:
        """Prefill the prompt into a fresh cache and memory."""
        from transformers import DynamicCache

        self.cache_kwargs = cache_kwargs(self.model, DynamicCache())
        self.kwargs = memory_kwargs(self.system)
        with torch.no_grad():
            out = self.model(
                input_ids=self.prompt, use_cache=True, logits_to_keep=1, **self.cache_kwargs, **self.kwargs
            )
        self.feed = out.logits[:, -1:].argmax(-1)

    def step(self) -> None:
        """Feed the last token; keep the greedy next one."""
        with torch.no_grad():
            out = self.model(
                input_ids=self.feed, use_cache=True, **self.cache_kwargs, **self.kwargs, **self.step_kwargs
            )
        self.feed = out.logits[:, -1:].argmax(-1)

    def run(self, steps: int) -> None:
        """Prefill, then ``steps`` decode steps (the memory probe's call)."""
        self.start()
        for _ in range(steps):
            self.step()


def generate(system: str, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """End-to-end greedy ``generate`` of exactly ``new_tokens`` tokens."""

    def call() -> None:
        with torch.no_grad():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **memory_kwargs(system),
            )

    return call


def decode_roofline(
    model: torch.nn.Module, context_tokens: int, gflops: float, gbs: float, batch: int = 1
) -> tuple[float, str]:
    """The least time of one decode step of ``batch`` sequences (seconds) and its bound: 2 FLOPs per parameter and
    sequence, every parameter read once (float32; a tied embedding counts once: the LM head reads it whole) plus each
    sequence's KV cache of ``context_tokens`` positions."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_floats = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context_tokens
    return _timing.roofline_s(2.0 * params * batch, 4.0 * (params + kv_floats * batch), gflops, gbs)


def interleaved_decode(
    decoders: dict[str, Decoder], steps: int, rounds: int, warmup_steps: int
) -> dict[str, dict[str, Any]]:
    """Per system, every decode step's time; the systems take turns step by step (prefills are not timed)."""
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for round_index in range(rounds + 1):
        for decoder in decoders.values():
            decoder.start()
        timed = round_index > 0  # round 0 warms up with a few steps
        for _ in range(steps if timed else warmup_steps):
            for name, decoder in decoders.items():
                start = time.perf_counter()
                decoder.step()
                elapsed = time.perf_counter() - start
                if timed:
                    times[name].append(elapsed)
    return {name: _timing.summarize(values, warmup=warmup_steps) for name, values in times.items()}


def phase_call(phase: str, system: str, model: torch.nn.Module, sizes: dict[str, int], vocab: int):
    """The call that one memory probe measures."""
    if phase == "train":
        return train_step(system, model, random_ids(sizes["train_tokens"], vocab, seed=1))
    if phase == "prefill":
        return prefill(system, model, random_ids(sizes["prefill_tokens"], vocab, seed=2))
    if phase == "decode":
        decoder = Decoder(system, model, random_ids(sizes["decode_prompt"], vocab, seed=3))
        return lambda: decoder.run(sizes["decode_steps"])
    raise ValueError(f"unknown phase {phase!r}")


def run_probe(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, Any]:
    """``--probe PHASE SYSTEM``: load one system and measure the peak memory of one call (subprocess side)."""
    phase, system = args.probe
    model = wrap(load_base(args.smoke, args.model), system)
    vocab = model.config.vocab_size
    # A small call of the same kind first: it pages in the weights (loaded lazily) and initialises the kernels,
    # which would otherwise count as the measured call's growth.
    phase_call(phase, system, model, WARMUP_SIZES, vocab)()
    gc.collect()
    return {"phase": phase, "system": system} | _timing.peak_mb(
        phase_call(phase, system, model, sizes, vocab), process_rss=True
    )


# ----- report ------------------------------------------------------------------------------------------------------
METRICS = (  # (key, title)
    ("train_step_s", "training step (s)"),
    ("prefill_s", "prefill (s)"),
    ("decode_ms_per_token", "decode (ms/token)"),
    ("decode_limit_ms_per_token", "decode roofline limit (ms/token)"),
    ("decode_limit_pct", "decode % of limit"),
    ("generate_s", "generate() total (s)"),
    ("train_peak_mb", "training peak (MB)"),
    ("prefill_peak_mb", "prefill peak (MB)"),
    ("decode_peak_mb", "decode peak (MB)"),
    ("trainable_params", "trainable params"),
)
TARGET_OF = {"train_step_s": "train", "prefill_s": "prefill", "decode_ms_per_token": "decode"}


def table_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: the three systems, δ-mem/base, δ-mem/LoRA and the target, where there is one."""
    rows = []
    for key, title in METRICS:
        values = {system: results[system].get(key) for system in SYSTEMS}
        if any(v is None for v in values.values()):
            continue
        row: dict[str, Any] = {"metric": title, "key": key, **values}
        row["deltamem_over_base"] = values["deltamem"] / values["base"] if values["base"] else None
        row["deltamem_over_lora"] = values["deltamem"] / values["lora"] if values["lora"] else None
        row["lora_over_base"] = values["lora"] / values["base"] if values["base"] else None
        if key in TARGET_OF:
            reference, limit = TARGETS[TARGET_OF[key]]
            ratio = row[f"deltamem_over_{reference}"]
            row["target"] = f"≤ {limit:.2f}× {'LoRA' if reference == 'lora' else 'base'}"
            row["met"] = "yes" if ratio <= limit else "no"
        rows.append(row)
    return rows


COLUMNS = {
    "metric": "metric",
    "base": "base",
    "lora": "LoRA",
    "deltamem": "δ-mem",
    "deltamem_over_base": "δ-mem/base",
    "deltamem_over_lora": "δ-mem/LoRA",
    "lora_over_base": "LoRA/base",
    "target": "target",
    "met": "met",
}


def _describe_roofline(roofline: dict[str, Any]) -> str:
    if "decode" not in roofline:
        return "decode not measured"
    decode = roofline["decode"]
    return f"{decode['matmul_gflops']:.0f} GFLOP/s, {decode['copy_gbs']:.1f} GB/s; bound: {decode['deltamem_bound']}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the markdown table, write the JSON; returns the JSON object."""
    parser = _timing.benchmark_parser(__doc__, "model_overhead")
    add_model_arg(parser)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 5; smoke 1)")
    parser.add_argument("--train-rounds", type=int, default=None, help="timed rounds of the training step (default 3)")
    parser.add_argument("--generate-rounds", type=int, default=None, help="timed rounds of generate() (default 2)")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=MEASUREMENTS,
        default=MEASUREMENTS,
        help="measure only these (default: all)",
    )
    parser.add_argument(
        "--decode-batch", type=int, default=1, help="sequences decoded together in decode and generate (default 1)"
    )
    parser.add_argument(
        "--decode-read-only",
        action="store_true",
        help="δ-mem's decode steps only read the memory (memory_write=False, as the server decodes)",
    )
    parser.add_argument(
        "--fused-decode",
        action="store_true",
        help="δ-mem decodes with the fused C++ step (peft_deltamem.ops.fused; built first, about a minute)",
    )
    _timing.add_probe_args(parser, ("PHASE", "SYSTEM"))
    args = _timing.parse_args(parser, argv)
    sizes = _timing.sizes_from_args(args, SMOKE if args.smoke else FULL)
    if args.fused_decode:  # only one-token δ-mem calls without gradients take it: decode and generate
        from peft_deltamem.ops.fused import enable_fused_decode

        enable_fused_decode()
    if args.probe:
        _timing.print_probe(run_probe(args, sizes))
        return {}
    rounds = args.rounds or (1 if args.smoke else 5)
    train_rounds = args.train_rounds or (1 if args.smoke else 3)
    generate_rounds = args.generate_rounds or (1 if args.smoke else 2)

    machine = _timing.start_report("model_overhead", args.smoke)
    load_start = _timing.load_average()
    started = time.perf_counter()
    base = load_base(args.smoke, args.model)
    vocab = base.config.vocab_size
    models = build_systems(base)
    results: dict[str, dict[str, Any]] = {name: {} for name in SYSTEMS}
    timings: dict[str, Any] = {}
    roofline: dict[str, Any] = {}
    for name, model in models.items():
        results[name]["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def record(key: str, measured: dict[str, dict[str, Any]], scale: float = 1.0) -> None:
        timings[key] = measured
        for name in SYSTEMS:
            results[name][key] = measured[name]["median_s"] * scale
        print(f"{key}: " + ", ".join(f"{n} {results[n][key]:.4g}" for n in SYSTEMS), flush=True)

    decode_rounds = max(1, rounds // 2) if not args.smoke else 1
    if "train" in args.only:
        train_ids = random_ids(sizes["train_tokens"], vocab, seed=1)
        calls = {n: train_step(n, m, train_ids) for n, m in models.items()}
        record("train_step_s", _timing.interleaved(calls, train_rounds))
    if "prefill" in args.only:
        prefill_ids = random_ids(sizes["prefill_tokens"], vocab, seed=2)
        prefill_calls = {n: prefill(n, m, prefill_ids) for n, m in models.items()}
        record("prefill_s", _timing.interleaved(prefill_calls, rounds))
    prompt = random_ids(sizes["decode_prompt"], vocab, seed=3, batch=args.decode_batch)
    if "decode" in args.only:
        decoders = {n: Decoder(n, m, prompt, read_only=args.decode_read_only) for n, m in models.items()}
        record("decode_ms_per_token", interleaved_decode(decoders, sizes["decode_steps"], decode_rounds, 4), 1e3)
        gflops, gbs = _timing.matmul_gflops("cpu"), _timing.memory_bandwidth_gbs("cpu")
        roofline["decode"] = {"matmul_gflops": gflops, "copy_gbs": gbs}
        context = sizes["decode_prompt"] + sizes["decode_steps"] // 2  # the mean position of a timed step
        for name in SYSTEMS:
            results[name]["decode_mean_ms_per_token"] = timings["decode_ms_per_token"][name]["mean_s"] * 1e3
            limit_s, bound = decode_roofline(models[name], context, gflops, gbs, args.decode_batch)
            results[name]["decode_limit_ms_per_token"] = limit_s * 1e3
            results[name]["decode_limit_pct"] = 100.0 * limit_s * 1e3 / results[name]["decode_ms_per_token"]
            roofline["decode"][f"{name}_bound"] = bound
    if "generate" in args.only:
        gen_calls = {n: generate(n, m, prompt, sizes["decode_steps"]) for n, m in models.items()}
        record("generate_s", _timing.interleaved(gen_calls, generate_rounds, warmup=1 if args.smoke else 0))

    in_process = args.smoke or args.in_process_memory
    memory_method = "in-process" if in_process else "subprocess per (phase, system)"
    for phase in PHASES if "memory" in args.only else ():
        for name in SYSTEMS:
            probe = _timing.measure_peak(
                phase_call(phase, name, models[name], sizes, vocab),
                Path(__file__),
                ["--probe", phase, name, "--model", args.model],
                in_process=in_process,
                threads=args.threads,
            )
            results[name][f"{phase}_peak_mb"] = probe["peak_mb"]
            results[name][f"{phase}_process_peak_rss_mb"] = probe["process_peak_rss_mb"]
            results[name]["memory_method"] = f"{probe['method']}, {memory_method}"
        print(
            f"{phase} peak MB: " + ", ".join(f"{n} {results[n][f'{phase}_peak_mb']:.0f}" for n in SYSTEMS), flush=True
        )

    rows = table_rows(results)
    load_end = _timing.load_average()
    notes = [
        f"Batch 1 (decode and generate: {args.decode_batch}; δ-mem decode step"
        f" {'fused (--fused-decode)' if args.fused_decode else 'eager'}"
        f"{', read-only (--decode-read-only)' if args.decode_read_only else ''}). Training step: {sizes['train_tokens']} tokens, forward + backward of the LM loss + zero_grad; δ-mem"
        " with memory=MemoryState() (writes with gradients); base frozen, backward w.r.t. the input embeddings.",
        f"Prefill: {sizes['prefill_tokens']} tokens, no grad, KV cache, logits_to_keep=1 (δ-mem writes a fresh memory).",
        f"Decode: {sizes['decode_steps']} greedy steps after a {sizes['decode_prompt']}-token prefill, KV cache"
        + (
            " (δ-mem only reads its memory each step)"
            if args.decode_read_only
            else " (δ-mem reads + writes its memory each step)"
        )
        + "; median over all timed steps, systems interleaved step by step.",
        f"generate(): prompt {sizes['decode_prompt']} + {sizes['decode_steps']} new tokens end to end, greedy.",
        "Decode roofline limit: the longer of 2 FLOPs per parameter at the best float32 matmul throughput and every"
        " parameter (float32) plus the KV cache read once at the copy bandwidth, both measured in this run"
        f" ({_describe_roofline(roofline)}); % of limit = limit / measured time.",
        f"Times: median over interleaved rounds (train {train_rounds}, prefill {rounds}, decode {decode_rounds}×"
        f"{sizes['decode_steps']} steps, generate {generate_rounds}), after warm-up; wall clock.",
        f"Peak MB: resident-set growth during one call ({memory_method})"
        + ("." if in_process else ", after a small warm-up call; glibc malloc set to return freed memory (PROBE_ENV)."),
        f"Load average (1, 5, 15 min) at start {load_start}, at end {load_end}.",
    ]
    _timing.print_report(rows, COLUMNS, notes)
    result = {
        "benchmark": "model_overhead",
        "smoke": args.smoke,
        "model": "tiny random Llama (smoke)" if args.smoke else args.model,
        "model_config": {k: getattr(base.config, k, None) for k in SMOKE_MODEL},
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "wall_s": time.perf_counter() - started,
        "settings": {
            "measured": list(args.only),
            **sizes,
            "rounds": rounds,
            "train_rounds": train_rounds,
            "decode_rounds": decode_rounds,
            "generate_rounds": generate_rounds,
            "memory": memory_method,
            "decode_batch": args.decode_batch,
            "fused_decode": args.fused_decode,
            "decode_read_only": args.decode_read_only,
        },
        "targets": {phase: {"reference": ref, "max_ratio": limit} for phase, (ref, limit) in TARGETS.items()},
        "notes": notes,
        "rows": rows,
        "systems": results,
        "timings": timings,
        "roofline": roofline,
    }
    return _timing.save_result(args.out, result)


if __name__ == "__main__":
    main()
