"""δ-mem on vLLM equals this package's own forward: tokens, final memories, sessions (docs/vllm.md).

One engine per geometry (module-scoped; an engine start costs ~30-60 s on 2 cores). Two geometries cover Llama and
Qwen3, r 8 and 16, one and four state heads, corrections on q,o and on q,k,v,o (test_preemption.py adds a third:
Llama, r 16, four heads, q,k,v,o). Each engine serves one batch that mixes a request starting
from a saved memory, one starting empty, a long prompt prefilled in chunks beside the others' decodes, and a
read-only request; then history writes, a stop-token finish, and the round trip with MemorySession files.
"""

from __future__ import annotations

import pytest
import torch

from peft_deltamem import MemoryState
from peft_deltamem.vllm import memory_request, wait_for_saved_memory
from tests.vllm._engines import build, hf_generate, hf_written, ids, max_difference, stop_engine

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # engine starts take 30-200 s; `make test-vllm` runs them
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

TOLERANCE = 1e-5

GEOMETRIES = [
    pytest.param(("llama", 8, 1, ("q", "o")), id="llama-r8-n1-qo"),
    pytest.param(("qwen3", 16, 4, ("q", "k", "v", "o")), id="qwen3-r16-n4-qkvo"),
]


@pytest.fixture(scope="module", params=GEOMETRIES)
def setup(request, tmp_path_factory):
    arch, r, heads, delta_heads = request.param
    torch.set_num_threads(1)
    built = build(arch, r, heads, delta_heads, tmp_path_factory.mktemp(f"{arch}-r{r}-n{heads}"))
    # A saved memory to start from: a history written by this package.
    history = ids(24, seed=7)
    written = hf_written(built.model, history)
    written.save(built.root / "start.safetensors")
    built.start = written
    yield built
    stop_engine(built.llm)


def _params(max_tokens: int, **memory) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        extra_args={"kv_transfer_params": memory_request(**memory)},
    )


def _run(llm, requests):
    """``requests``: (prompt ids, SamplingParams); one generate call, so they share batches."""
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    return llm.generate(prompts, [s for _, s in requests], use_tqdm=False)


def test_mixed_batch_equals_peft(setup):
    """From a saved memory, from an empty one, a long chunked prompt and a read-only request, in one batch."""
    root, model, start = setup.root, setup.model, setup.start
    from_memory, empty, long, read_only = ids(10, 1), ids(7, 2), ids(75, 3), ids(9, 4)
    outs = _run(
        setup.llm,
        [
            (from_memory, _params(6, load=root / "start.safetensors", save=root / "a.safetensors")),
            (empty, _params(6, save=root / "b.safetensors")),
            (long, _params(4, load=root / "start.safetensors", save=root / "c.safetensors")),
            (read_only, _params(5, load=root / "start.safetensors", read_only=True)),
        ],
    )
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert tokens[0] == hf_generate(model, from_memory, 6, start)
    assert tokens[1] == hf_generate(model, empty, 6)
    assert tokens[2] == hf_generate(model, long, 4, start)
    assert tokens[3] == hf_generate(model, read_only, 5, start, write=False)
    # The final memory covers the prompt and every generated token but the last (never fed through the model).
    for out, prompt, memory in zip(outs[:3], (from_memory, empty, long), (start, None, start), strict=True):
        saved = MemoryState.load(wait_for_saved_memory(out, timeout=30))
        expected = hf_written(model, prompt + list(out.outputs[0].token_ids[:-1]), memory)
        assert max_difference(saved, expected) < TOLERANCE
    assert "deltamem_saved" not in outs[3].kv_transfer_params  # a read-only request saves nothing
    assert max_difference(MemoryState.load(root / "start.safetensors"), start) == 0.0  # its memory is untouched


def test_history_write(setup):
    """A write-only request (max_tokens=1) writes its prompt, unwritten context positions read but not written."""
    root, model, start = setup.root, setup.model, setup.start
    history, context = ids(40, 5), ids(30, 6)
    outs = _run(
        setup.llm,
        [
            (history, _params(1, load=root / "start.safetensors", save=root / "h1.safetensors")),
            (context, _params(1, save=root / "h2.safetensors", unwritten=[(0, 4), (20, 23)])),
        ],
    )
    first = MemoryState.load(wait_for_saved_memory(outs[0], timeout=0.5))  # saved before the answer came back
    assert max_difference(first, hf_written(model, history, start)) < TOLERANCE
    second = MemoryState.load(wait_for_saved_memory(outs[1], timeout=0.5))
    assert max_difference(second, hf_written(model, context, None, unwritten=[(0, 4), (20, 23)])) < TOLERANCE


def test_stop_token_finish_is_saved(setup):
    """A request that ends on a stop token is saved by the engine's next step; the caller waits for the file."""
    root, model, start = setup.root, setup.model, setup.start
    prompt = ids(12, 8)
    reference = hf_generate(model, prompt, 6, start)
    stop = reference[2]
    stop_at = reference.index(stop)
    params = SamplingParams(
        max_tokens=6,
        temperature=0.0,
        stop_token_ids=[stop],
        extra_args={"kv_transfer_params": memory_request(load=root / "start.safetensors", save=root / "s.safetensors")},
    )
    out = _run(setup.llm, [(prompt, params)])[0]
    assert list(out.outputs[0].token_ids) == reference[: stop_at + 1]
    saved = MemoryState.load(wait_for_saved_memory(out, timeout=30))
    assert max_difference(saved, hf_written(model, prompt + reference[:stop_at], start)) < TOLERANCE


def test_memory_files_cross_between_engines(setup):
    """A memory written by vLLM starts this package's generate, and one written by this package starts vLLM."""
    root, model = setup.root, setup.model
    history, question = ids(20, 9), ids(8, 10)
    out = _run(setup.llm, [(history, _params(1, save=root / "x.safetensors"))])[0]
    from_vllm = MemoryState.load(wait_for_saved_memory(out, timeout=0.5))
    # vLLM's memory in this package: same layout and adapter config as the package's own memories.
    own = hf_written(model, history)
    assert from_vllm.layout == own.layout
    assert from_vllm.adapter_config["r"] == own.adapter_config["r"]
    ours = hf_generate(model, question, 5, from_vllm, write=False)
    theirs = _run(setup.llm, [(question, _params(5, load=root / "x.safetensors", read_only=True))])[0]
    assert list(theirs.outputs[0].token_ids) == ours
