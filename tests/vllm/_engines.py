"""Tiny δ-mem models, their vLLM checkpoints and engines, and the reference results of this package's own forward."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem.chat.segments import NOT_WRITTEN
from peft_deltamem.serving.window import _write_token_runs
from peft_deltamem.vllm import kv_transfer_config, memory_request
from peft_deltamem.vllm.export import export_vllm_checkpoint
from tests.helpers.tiny_models import randomize_adapter, tiny_model

# head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... (not the 16 of the main suite's tiny models).
GEOMETRY = {
    "llama": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1),
    "qwen3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}


@dataclass
class Setup:
    arch: str
    root: Path
    model: object  # the PeftModel (reference)
    llm: object  # the vLLM engine serving the exported checkpoint
    vocab: int
    start: MemoryState | None = None  # a history written by this package, saved as root / "start.safetensors"


def build(
    arch: str,
    r: int,
    heads: int,
    delta_heads: tuple[str, ...],
    root: Path,
    *,
    vocab: int = 128,
    seed: int = 0,
    **engine_kwargs,
) -> Setup:
    """A tiny random ``arch`` with a randomised δ-mem adapter, exported and served by a vLLM engine."""
    base = tiny_model(arch, seed=seed, vocab_size=vocab, eos_token_id=None, **GEOMETRY[arch])
    base.generation_config.eos_token_id = None
    base.save_pretrained(root / "base")
    config = DeltaMemConfig(task_type="CAUSAL_LM", r=r, num_state_heads=heads, delta_heads=list(delta_heads))
    model = get_peft_model(base, config)
    randomize_adapter(model, seed=seed, scale=0.5)
    model.eval()
    model.save_pretrained(root / "adapter")
    export_vllm_checkpoint(root / "adapter", root / "vllm", str(root / "base"))
    return Setup(arch, root, model, start_engine(root / "vllm", **engine_kwargs), vocab)


def save_start(setup: Setup) -> None:
    """Give ``setup`` a memory to start requests from: a 24-token history written by this package, saved."""
    setup.start = hf_written(setup.model, ids(24, seed=7))
    setup.start.save(setup.root / "start.safetensors")


def start_engine(path: Path, **kwargs):
    from vllm import LLM

    settings = dict(
        model=str(path),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        kv_transfer_config=kv_transfer_config(),
        max_num_seqs=8,
        max_num_batched_tokens=32,  # long prompts are prefilled in chunks, mixed with other requests' decodes
        enable_chunked_prefill=True,
        seed=0,
    )
    settings.update(kwargs)
    return LLM(**settings)


def stop_engine(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def sampling(max_tokens: int, **memory):
    """Greedy ``SamplingParams`` (end of sequence ignored) with the δ-mem request parameters ``memory``."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        extra_args={"kv_transfer_params": memory_request(**memory)},
    )


def generate(llm, requests) -> list:
    """``requests``: (prompt ids, SamplingParams); one generate call, so they share batches."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    return llm.generate(prompts, [s for _, s in requests], use_tqdm=False)


def ids(n: int, seed: int, vocab: int = 128) -> list[int]:
    """``n`` token ids avoiding the special ids 0-2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=generator).tolist()


# ----- the reference: this package's own forward --------------------------------------------------------------------
@torch.no_grad()
def hf_generate(model, prompt: list[int], n: int, memory: MemoryState | None = None, write: bool = True) -> list[int]:
    """Greedy tokens of ``PeftModel.generate(memory=...)`` (the memory is not changed)."""
    mem = memory.clone() if memory is not None else MemoryState()
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        memory=mem,
        memory_write=write,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_written(model, tokens: list[int], memory: MemoryState | None = None, unwritten=()) -> MemoryState:
    """The memory after writing ``tokens`` from ``memory``, tokens in ``unwritten`` ranges read but not written, as
    the server writes (``serving.window._write_token_runs``)."""
    mem = memory.clone() if memory is not None else MemoryState()
    message_ids = [0] * len(tokens)
    for a, b in unwritten:
        for i in range(a, b):
            message_ids[i] = NOT_WRITTEN
    heads = next(iter(model.peft_config.values())).num_state_heads
    if all(m != NOT_WRITTEN for m in message_ids):
        model(input_ids=torch.tensor([tokens]), memory=mem)
    else:
        _write_token_runs(model, mem, torch.tensor([tokens]), message_ids, {}, heads)
    return mem


def max_difference(a: MemoryState, b: MemoryState) -> float:
    assert a.layout == b.layout, (a.layout, b.layout)
    return max((a.states[k].float() - b.states[k].float()).abs().max().item() for k in a.states)


def relative_difference(a: MemoryState, b: MemoryState) -> float:
    """:func:`max_difference` over the reference ``b``'s largest entry (at least 1).

    vLLM's chunked scan and this package's token loop round differently in float32; the difference grows with the
    states' size (entries of 2-4 on these random adapters: absolute differences up to ~2e-5 on some models), so the
    tests bound it relative to that size.
    """
    scale = max(b.states[k].float().abs().max().item() for k in b.states)
    return max_difference(a, b) / max(1.0, scale)
